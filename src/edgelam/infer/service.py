"""A module as an HTTP service (FastAPI on uvicorn, its own process): ``edgelam serve``.

Endpoints:
  POST   /v1/forward            safetensors in, safetensors out (application/x-safetensors)
  DELETE /v1/sessions/{id}      close a session and free its KV cache
  GET    /health                the process is up
  GET    /ready                 the module is loaded and serving
  GET    /info                  model, module, sizes, adapters, open sessions
  GET    /metrics               Prometheus text: requests, tokens, errors, latency, sessions
A bad request gets a JSON ``{"error": ...}`` with 400 (malformed, wrong shape, unknown adapter),
409 (a session out of step: replay it), 413 (body too large) or 415 (not safetensors).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from edgelam.infer.modules import ModuleError, ModuleHost
from edgelam.infer.wire import CONTENT_TYPE, WireError, pack, unpack

MAX_BODY_BYTES = 256 * 1024 * 1024


def create_app(host: ModuleHost, wire_dtype: str = "float32", sweep_every_s: float | None = None) -> FastAPI:
    sweep = sweep_every_s if sweep_every_s is not None else min(5.0, max(host.session_ttl_s / 2, 0.1))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(sweep)
                host.expire()

        task = asyncio.create_task(sweeper())
        yield
        task.cancel()

    app = FastAPI(title=f"EdgeLAM module {host.spec}", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        return {"ready": True, "module": str(host.spec), "model": host.model_name}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return host.info()

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        labels = f'module="{host.spec}"'
        lines = []
        for key, value in host.stats.items():
            kind = "counter" if key.endswith("_total") or key.endswith("_sum") else "gauge"
            lines += [f"# TYPE edgelam_{key} {kind}", f"edgelam_{key}{{{labels}}} {value}"]
        lines += ["# TYPE edgelam_sessions_open gauge", f"edgelam_sessions_open{{{labels}}} {len(host.sessions)}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.delete("/v1/sessions/{session}")
    def close(session: str) -> dict[str, bool]:
        return {"closed": host.close(session)}

    @app.post("/v1/forward")
    async def forward(request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if ctype != CONTENT_TYPE:
            return error(415, f"content-type must be {CONTENT_TYPE} (a safetensors message), got '{ctype}'")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error(413, f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            tensors, meta = unpack(body)
            # the model runs in a worker thread so health checks stay responsive
            out, out_meta = await asyncio.to_thread(host.forward, tensors, meta)
        except WireError as exc:
            return error(400, str(exc))
        except ModuleError as exc:
            return error(exc.status, str(exc))
        return Response(pack(out, out_meta, wire_dtype), media_type=CONTENT_TYPE)

    return app


def serve(model: str, module: str, port: int, host: str = "127.0.0.1", adapters: dict[str, str] | None = None,
          session_ttl_s: float = 300.0, wire_dtype: str = "float32") -> None:
    """Load the module, then serve it until stopped (SIGINT / SIGTERM)."""
    import uvicorn

    from edgelam.infer.modules import ModuleSpec

    mod = ModuleHost(model, ModuleSpec.parse(module), adapters, session_ttl_s=session_ttl_s)
    uvicorn.run(create_app(mod, wire_dtype), host=host, port=port, log_level="warning", access_log=False)
