"""A bound on requests in flight, for every HTTP app (module services and the gateway): a flood of
requests is answered at once instead of piling up threads, sockets and memory.

Beyond ``max_concurrent`` requests in flight, a request gets **503 Service Unavailable** with
``Retry-After`` and one JSON error naming the limit and the flag that raises it. 503 rather than
429: the server is at capacity, the client did nothing wrong (429 is a per-client quota), and
clients already retry a 503 (the ``openai`` client backs off; a pipeline stage fails over to a
replica of the range, as for any 5xx). Health and monitoring endpoints are never refused, so an
orchestrator does not mistake a busy service for a dead one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_SERVICE_MAX_CONCURRENT = 256  # a pipeline sends one request per stage per generation
DEFAULT_GATEWAY_MAX_CONCURRENT = 64  # one generation runs at a time; the others wait their turn
EXEMPT = ("/health", "/ready", "/metrics")
RETRY_AFTER_S = 1


class ConcurrencyLimit:
    """ASGI middleware: at most ``max_concurrent`` HTTP requests in flight (``EXEMPT`` paths aside);
    ``flag`` is the command-line flag that sets the limit, ``render`` shapes the error body. A
    streamed answer counts until its last byte is sent. One event loop runs the app, so a plain
    counter is exact."""

    def __init__(self, app: ASGIApp, max_concurrent: int, flag: str,
                 render: Callable[[str], dict[str, Any]] = lambda m: {"error": m}) -> None:
        if max_concurrent < 1:
            raise ValueError(f"{flag} must be >= 1, got {max_concurrent}")
        self.app, self.max_concurrent, self.flag, self.render = app, max_concurrent, flag, render
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            message = (f"{self.in_flight} requests are in flight, the limit of this server ({self.flag} "
                       f"{self.max_concurrent}); retry after {RETRY_AFTER_S} s")
            # the body is left unread: the connection is not reused
            headers = {"retry-after": str(RETRY_AFTER_S), "connection": "close"}
            await JSONResponse(self.render(message), status_code=503, headers=headers)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
