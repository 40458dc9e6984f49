"""A man in the middle for the integrity tests: an HTTP relay (its own process) between a client and an
``edgelam serve`` process that tampers with ``POST /v1/forward`` traffic according to its mode.

    python tests/mitm_relay.py --upstream http://127.0.0.1:8101 --port 8200

Modes (``PUT /__relay/mode/<mode>`` switches and forgets what was captured):
  pass           relay unchanged
  flip-request   flip the lowest bit of a request body's last byte (tensor data: still valid safetensors)
  flip-response  the same on a successful response's body
  replay         capture the first request; send that capture in place of every later one
  swap           hold the first request until a second arrives; send the second, then the first
Every other path is relayed unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
MODES = ("pass", "flip-request", "flip-response", "replay", "swap")


def flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1]) if data else data


class Relay:
    def __init__(self, upstream: str) -> None:
        self.upstream, self.mode = upstream.rstrip("/"), "pass"
        self.client = httpx.AsyncClient(timeout=30.0)
        self.captured: tuple[bytes, dict[str, str]] | None = None
        self.held: asyncio.Event | None = None  # swap: set once the second request has been answered

    def reset(self, mode: str) -> None:
        self.mode, self.captured, self.held = mode, None, None

    async def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        resp = await self.client.request(method, f"{self.upstream}{path}", content=body, headers=headers)
        content = resp.content
        if self.mode == "flip-response" and path == "/v1/forward" and resp.status_code == 200:
            content = flip(content)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP and k.lower() != "content-encoding"}
        return Response(content, status_code=resp.status_code, headers=out)

    async def forward(self, body: bytes, headers: dict[str, str]) -> Response:
        if self.mode == "flip-request":
            body = flip(body)
        elif self.mode == "replay":
            if self.captured is None:
                self.captured = (body, headers)
            else:
                body, headers = self.captured
        elif self.mode == "swap":
            if self.held is None:  # the first: wait until the second has gone through
                self.held = asyncio.Event()
                await asyncio.wait_for(self.held.wait(), timeout=20)
            else:
                resp = await self.send("POST", "/v1/forward", body, headers)
                self.held.set()
                return resp
        return await self.send("POST", "/v1/forward", body, headers)

    async def handle(self, request: Request) -> Any:
        path = request.url.path
        if path.startswith("/__relay/mode/"):
            mode = path.rsplit("/", 1)[1]
            if mode not in MODES:
                return JSONResponse({"error": f"mode must be one of {MODES}"}, status_code=400)
            self.reset(mode)
            return JSONResponse({"mode": mode})
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        if request.method == "POST" and path == "/v1/forward":
            return await self.forward(body, headers)
        return await self.send(request.method, path + (f"?{request.url.query}" if request.url.query else ""), body,
                               headers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    relay = Relay(args.upstream)
    app = Starlette(routes=[Route("/{path:path}", relay.handle, methods=["GET", "POST", "PUT", "DELETE"])])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
