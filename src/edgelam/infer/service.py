"""A module as an HTTP service (FastAPI on uvicorn, its own process): ``edgelam serve``.

Endpoints:
  POST   /v1/forward            safetensors in, safetensors out (application/x-safetensors)
  POST   /v1/predict            JSON {"inputs": text | [inputs], "adapter"?, "truncate"?} -> the task's
                                answers (a classifier's label and scores; a decoder's next token; a
                                channel predictor's future CSI)
  DELETE /v1/sessions/{id}      close a session and free its KV cache
  GET    /health                the process is up
  GET    /ready                 the module is loaded and serving
  GET    /info                  model, module, sizes, limits, adapters, open sessions
  GET    /metrics               Prometheus text: requests, tokens, errors, latency, sessions
A bad request gets a JSON ``{"error": ...}`` with 400 (malformed, wrong shape, unknown adapter),
409 (a session out of step: replay it), 413 (body, tokens per request or context too large;
the body limit is checked on Content-Length and while reading, before the body is buffered) or
415 (not safetensors). With keys (``--keys FILE --node NAME``, ``security/mac.py``) the POST and DELETE
endpoints take only signed requests: 401 when the MAC headers are missing or malformed, 403 for an
unknown node, a MAC that does not verify (body or headers altered) or a sequence number not above
the last accepted one for that (session, node) (a replay or reorder); successful answers are signed.
An unexpected failure is a JSON 500 with ``Connection: close``, so a
keep-alive client never meets a reset connection. ``errors_total`` counts every error response.
More than ``--max-concurrent`` requests in flight: 503 with Retry-After (``limits.py``; /health, /ready
and /metrics always answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgelam.infer import openapi
from edgelam.infer.batching import Batcher
from edgelam.infer.limits import DEFAULT_SERVICE_MAX_CONCURRENT, ConcurrencyLimit
from edgelam.infer.modules import DEFAULT_MAX_REQUEST_TOKENS, ModuleError, ModuleHost
from edgelam.infer.push import Forwarder
from edgelam.infer.wire import CONTENT_TYPE, WireError, pack, unpack
from edgelam.security.mac import Envelope, LinkGuard, LinkRefused, Signer, bound

MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_PREDICT_INPUTS = 256
log = logging.getLogger("edgelam.serve")


@dataclass(frozen=True)
class ServiceState:
    host: ModuleHost
    wire_dtype: str
    max_body_bytes: int
    sweep_every_s: float
    guard: LinkGuard | None = None  # None: no keys, requests are not authenticated
    forwarder: Forwarder | None = None  # runs the module and pushes to the next stage (infer/push.py)
    threads: dict[str, Any] | None = None  # the thread budget in effect (infer/threads.py)
    batcher: Batcher | None = None  # the model thread; batches concurrent sessions' decode steps


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """A JSON error; ``close`` when the request body was left unread (the connection cannot be reused)."""
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


class BodyTooLarge(ValueError):
    """A request body over the limit (found on Content-Length or while reading)."""


class ErrorGuard:
    """ASGI middleware: counts every error response in ``stats["errors_total"]`` (when given) and turns an
    unexpected exception into a JSON 500 with ``Connection: close`` (instead of a dropped keep-alive
    connection); ``render`` shapes the error body from its message."""

    def __init__(self, app: ASGIApp, stats: dict[str, Any] | None = None,
                 render: Callable[[str], dict[str, Any]] = lambda m: {"error": m}) -> None:
        self.app, self.stats, self.render = app, stats, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and self.stats is not None:
                    self.stats["errors_total"] += 1
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            log.exception("unexpected error on %s", scope.get("path"))
            body = self.render(f"internal error: {type(exc).__name__}: {exc}")
            await JSONResponse(body, status_code=500, headers={"connection": "close"})(scope, receive, watch)


def is_safetensors(content_type: str) -> bool:
    """Media types are case-insensitive and may carry parameters (``; charset=binary``)."""
    return content_type.split(";", 1)[0].strip().lower() == CONTENT_TYPE


async def read_limited(request: Request, limit: int) -> bytes:
    """The body; ``BodyTooLarge`` as soon as Content-Length or the bytes read so far pass ``limit``."""
    declared = request.headers.get("content-length", "")  # the HTTP parser has checked its syntax
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes (Content-Length) exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body of more than {limit} bytes exceeds the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def state_of(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


async def forward(request: Request) -> Response:
    st = state_of(request)
    ctype = request.headers.get("content-type", "")
    if not is_safetensors(ctype):
        return error(415, f"content-type must be {CONTENT_TYPE} (a safetensors message), got '{ctype}'", close=True)
    try:
        body = await read_limited(request, st.max_body_bytes)
    except BodyTooLarge as exc:
        return error(413, f"{exc} (edgelam serve --max-body-mb)", close=True)
    try:
        env = st.guard.check("forward", request.headers, body) if st.guard else None  # before parsing the body
        tensors, meta = unpack(body)
        if env is not None and bound(meta) != (env.session, env.position):
            raise LinkRefused(403, "the body's session or position differs from the signed X-EdgeLAM-Session / "
                                   "X-EdgeLAM-Position headers")
        # the model runs in a worker thread so health checks stay responsive
        hops = st.forwarder.hops(meta) if st.forwarder is not None else []
        # the model runs in the service's one model thread (health checks stay responsive; torch's OpenMP pool
        # belongs to one thread), batched with other sessions' decode steps (infer/batching.py)
        assert st.batcher is not None
        out, out_meta = await st.batcher.forward(tensors, meta)
        if hops and st.forwarder is not None:  # the push waits on the network in another thread: the model
            # thread takes the next request
            out, out_meta = await asyncio.to_thread(st.forwarder.push, hops, out, out_meta, meta)
    except LinkRefused as exc:
        return error(exc.status, str(exc))
    except WireError as exc:
        return error(400, str(exc))
    except ModuleError as exc:
        return error(exc.status, str(exc))
    return signed(st, env, pack(out, out_meta, st.wire_dtype), CONTENT_TYPE)


def signed(st: ServiceState, env: Envelope | None, data: bytes, media_type: str) -> Response:
    """An answer, with the MAC headers when the request was authenticated."""
    headers = st.guard.answer(env, data) if st.guard is not None and env is not None else None
    return Response(data, media_type=media_type, headers=headers)


def predict_request(body: bytes) -> tuple[list[Any], str | None, bool]:
    """(inputs, adapter, truncate) of a /v1/predict body; ``ValueError`` naming what is wrong."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ValueError(f"the body must be JSON ({exc})") from None
    if not isinstance(req, dict):
        raise ValueError('the body must be a JSON object {"inputs": ...}')
    inputs = req.get("inputs")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("'inputs' must be a non-empty string or a non-empty list (texts; CSI arrays for a channel "
                         "predictor)")
    if len(inputs) > MAX_PREDICT_INPUTS:
        raise ValueError(f"{len(inputs)} inputs in one request; at most {MAX_PREDICT_INPUTS}")
    adapter, truncate = req.get("adapter"), req.get("truncate", False)
    if adapter is not None and not isinstance(adapter, str) or not isinstance(truncate, bool):
        raise ValueError("'adapter' must be a string (an adapter name) and 'truncate' a boolean")
    unknown = sorted(set(req) - {"inputs", "adapter", "truncate"})
    if unknown:
        raise ValueError(f"unknown fields {unknown}; a request has inputs, adapter and truncate")
    return inputs, adapter, truncate


async def predict(request: Request) -> Response:
    st = state_of(request)
    try:
        body = await read_limited(request, st.max_body_bytes)
        env = st.guard.check("predict", request.headers, body) if st.guard else None
        inputs, adapter, truncate = predict_request(body)
        assert st.batcher is not None
        answers = await st.batcher.call(st.host.predict, inputs, adapter, truncate)
    except BodyTooLarge as exc:
        return error(413, f"{exc} (edgelam serve --max-body-mb)", close=True)
    except LinkRefused as exc:
        return error(exc.status, str(exc))
    except ModuleError as exc:
        return error(exc.status, str(exc))
    except ValueError as exc:
        return error(400, str(exc))
    host = st.host
    reply = {"model": host.model_name, "task": host.task.name, "adapter": adapter, "predictions": answers}
    return signed(st, env, bytes(JSONResponse(reply).body), "application/json")


def health() -> dict[str, str]:
    return {"status": "ok"}


def ready(request: Request) -> dict[str, Any]:
    host = state_of(request).host
    return {"ready": True, "module": str(host.spec), "model": host.model_name, "task": host.task.name}


def info(request: Request) -> dict[str, Any]:
    st = state_of(request)
    return {**st.host.info(), "threads": st.threads, "quantized": getattr(st.host, "quantized", None),
            "max_batch": st.batcher.max_batch if st.batcher is not None else 1,
            "push_to": sorted(st.forwarder.allowed) if st.forwarder is not None else []}


def metrics(request: Request) -> PlainTextResponse:
    host = state_of(request).host
    labels = f'module="{host.spec}"'
    lines = []
    for key, value in host.stats.items():
        kind = "counter" if key.endswith("_total") or key.endswith("_sum") else "gauge"
        lines += [f"# TYPE edgelam_{key} {kind}", f"edgelam_{key}{{{labels}}} {value}"]
    lines += ["# TYPE edgelam_sessions_open gauge", f"edgelam_sessions_open{{{labels}}} {len(host.sessions)}"]
    return PlainTextResponse("\n".join(lines) + "\n")


def close_session(session: str, request: Request) -> Any:
    st = state_of(request)
    if st.guard is not None:
        try:
            env = st.guard.check("close", request.headers, b"")
        except LinkRefused as exc:
            return error(exc.status, str(exc))
        if env.session != session:
            return error(403, f"the request is signed for session '{env.session}', not '{session}'")
    return {"closed": st.host.close(session)}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Close idle sessions every ``sweep_every_s`` while the service runs."""
    st: ServiceState = app.state.service

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(st.sweep_every_s)
            st.host.expire()

    task = asyncio.create_task(sweeper())
    yield
    task.cancel()


def create_app(host: ModuleHost, wire_dtype: str = "float32", sweep_every_s: float | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, guard: LinkGuard | None = None,
               max_concurrent: int = DEFAULT_SERVICE_MAX_CONCURRENT, push_to: frozenset[str] = frozenset(),
               threads: dict[str, Any] | None = None, max_batch: int = 32) -> FastAPI:
    """The service's app; with ``guard`` every POST / DELETE must be signed and answers are signed;
    ``push_to``: the next-stage URLs its forward calls may push to (``infer/push.py``); ``max_batch``: the most
    decode steps of concurrent sessions run as one batch (1: one request at a time; ``infer/batching.py``)."""
    sweep = sweep_every_s if sweep_every_s is not None else min(5.0, max(host.session_ttl_s / 2, 0.1))
    app = FastAPI(title=f"EdgeLAM module {host.spec}", lifespan=lifespan)
    signer = Signer(guard.ring, guard.node) if guard is not None else None
    forwarder = Forwarder(host, frozenset(u.rstrip("/") for u in push_to), signer, wire_dtype)
    app.state.service = ServiceState(host, wire_dtype, max_body_bytes, sweep, guard, forwarder, threads,
                                     Batcher(host, max_batch))
    app.add_middleware(ConcurrencyLimit, max_concurrent=max_concurrent, flag="edgelam serve --max-concurrent")
    app.add_middleware(ErrorGuard, stats=host.stats)  # outside the limit: its 503s are counted too
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/info", info, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/sessions/{session}", close_session, methods=["DELETE"])
    app.add_api_route("/v1/forward", forward, methods=["POST"], openapi_extra=openapi.FORWARD)
    app.add_api_route("/v1/predict", predict, methods=["POST"], openapi_extra=openapi.PREDICT)
    return app


def serve(model: str | None, module: str, port: int, host: str = "127.0.0.1", adapters: dict[str, str] | None = None,
          session_ttl_s: float = 300.0, wire_dtype: str = "float32",
          max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS, max_body_bytes: int = MAX_BODY_BYTES,
          keys: str | None = None, node: str | None = None, tls: tuple[str, str] | None = None,
          max_concurrent: int = DEFAULT_SERVICE_MAX_CONCURRENT, push_to: frozenset[str] = frozenset(),
          threads: int | None = None, cpus: tuple[int, ...] | None = None, max_batch: int = 32,
          quantize: str | None = None) -> None:
    """Load the module, then serve it until stopped (SIGINT / SIGTERM). ``keys`` (a keyring) and ``node``
    (this service's name in it) authenticate the links; ``tls`` = (certificate, private key) serves HTTPS;
    ``push_to``: next-stage URLs it may push to; ``threads`` / ``cpus``: its thread budget; ``quantize``: int8
    weights for the blocks and LM head (``infer/quantize.py``)."""
    import uvicorn

    from edgelam.infer.launch import die_with_parent
    from edgelam.infer.modules import ModuleSpec
    from edgelam.infer.threads import apply as apply_threads
    from edgelam.security.keys import KeyringError, load_keyring

    die_with_parent()  # started by a gateway / `edgelam infer`: never outlive it
    budget = apply_threads(threads, cpus)
    if (keys is None) != (node is None):
        raise KeyringError("--keys FILE and --node NAME go together (the keyring, and this service's name in it)")
    guard = LinkGuard(load_keyring(keys), node) if keys is not None and node is not None else None
    mod = ModuleHost(model, ModuleSpec.parse(module), adapters, session_ttl_s=session_ttl_s,
                     max_request_tokens=max_request_tokens)
    if quantize is not None:
        from edgelam.infer.quantize import quantize as quantize_host

        quantize_host(mod, quantize)
    app = create_app(mod, wire_dtype, max_body_bytes=max_body_bytes, guard=guard, max_concurrent=max_concurrent,
                     push_to=push_to, threads=budget, max_batch=max_batch)
    # a TLS connection's close waits for the peer's close_notify: bound the graceful shutdown then
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
                timeout_graceful_shutdown=2 if tls else None)
