"""The gateway's front door: ``Authorization: Bearer <API key>`` on every request except the open paths.

No or malformed ``Authorization`` is 401 (with ``WWW-Authenticate: Bearer``), a key that is not in
the keyring is 403, both as OpenAI-style JSON errors, so the ``openai`` client raises
``AuthenticationError`` / ``PermissionDeniedError``. Keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key (no early exit, no length leak).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def known(token: str, digests: list[bytes]) -> bool:
    """Whether ``token`` is one of the keys whose digests are given, in time independent of which."""
    d = digest(token)
    return any([hmac.compare_digest(d, k) for k in digests])  # a list: every key is compared


def bearer_token(header: str) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), or None when malformed."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def auth_error(status: int, message: str, code: str) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    headers = {"connection": "close"}  # the request body is left unread
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


class BearerGuard:
    """ASGI middleware: HTTP requests outside ``open_paths`` need a bearer token among ``api_keys``' values."""

    def __init__(self, app: ASGIApp, api_keys: dict[str, str], open_paths: tuple[str, ...] = ("/health",)) -> None:
        if not api_keys:
            raise ValueError("BearerGuard needs at least one API key")
        self.app, self.open_paths = app, open_paths
        self.digests = [digest(k) for k in api_keys.values()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        if raw is None:
            refusal = auth_error(401, "missing Authorization header: send `Authorization: Bearer <API key>` (the "
                                      "openai client: OpenAI(api_key=...)); keys come from `edgelam keys --api-key "
                                      "NAME`", "missing_api_key")
        elif (token := bearer_token(raw.decode("latin-1"))) is None:
            refusal = auth_error(401, "malformed Authorization header: it must be `Bearer <API key>`",
                                 "invalid_authorization")
        elif not known(token, self.digests):
            refusal = auth_error(403, "the API key is not valid for this gateway", "invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        await refusal(scope, receive, send)
