"""The front door: an OpenAI-compatible API in front of any topology (pipeline, speculative, ...).

    POST /v1/chat/completions   {model, messages, max_tokens | max_completion_tokens, stream}
    POST /v1/completions        {model, prompt, max_tokens, stream}
    GET  /v1/models, /health
Streaming answers are server-sent events (``data: {chunk}`` ... ``data: [DONE]``) in OpenAI's
chunk format, so the ``openai`` Python client works unchanged (``base_url=.../v1``). Decoding is
greedy; a request asking for sampling (temperature > 0, top_p < 1, n > 1) is refused with 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgelam.infer.client import StageDown

# a backend turns (prompt token ids, max new tokens, eos id) into a stream of token ids
Backend = Callable[[list[int], int, int | None], Iterator[int]]


class BadRequest(ValueError):
    pass


def _greedy_only(body: dict[str, Any]) -> None:
    if (body.get("temperature") or 0) > 0:
        raise BadRequest("only greedy decoding is served: set temperature to 0 (or leave it out)")
    if body.get("top_p") not in (None, 1, 1.0):
        raise BadRequest("only greedy decoding is served: leave top_p out")
    if body.get("n") not in (None, 1):
        raise BadRequest("n must be 1")


def _max_tokens(body: dict[str, Any], default: int, limit: int) -> int:
    n = body.get("max_completion_tokens", body.get("max_tokens", default))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return min(n, limit)


def create_gateway(backend: Backend, tokenizer: Any, model_id: str, default_max_tokens: int = 64,
                   max_tokens_limit: int = 1024) -> FastAPI:
    app = FastAPI(title=f"EdgeLAM gateway ({model_id})")
    lock = threading.Lock()  # a topology's coordinator serves one generation at a time

    def bad(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    def run(ids: list[int], max_new: int) -> Iterator[tuple[str, int, str | None]]:
        """(text delta, tokens so far, finish reason or None) as tokens arrive."""
        eos = tokenizer.eos_token_id
        out: list[int] = []
        text = ""
        with lock:
            for tok in backend(ids, max_new, eos):
                if tok == eos:
                    yield "", len(out), "stop"
                    return
                out.append(tok)
                full = tokenizer.decode(out, skip_special_tokens=True)
                if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                delta, text = full[len(text):], full
                yield delta, len(out), None
        full = tokenizer.decode(out, skip_special_tokens=True)
        yield full[len(text):], len(out), "length"

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body must be JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def respond(kind: str, body: dict[str, Any], ids: list[int]) -> Any:
        _greedy_only(body)
        max_new = _max_tokens(body, default_max_tokens, max_tokens_limit)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(delta: str, finish: str | None, streaming: bool) -> dict[str, Any]:
            if kind == "chat":
                key = "delta" if streaming else "message"
                msg = {"content": delta} if streaming else {"role": "assistant", "content": delta}
                return {"index": 0, key: msg, "finish_reason": finish}
            return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

        if body.get("stream"):
            def events() -> Iterator[str]:
                first = True
                for delta, _, finish in run(ids, max_new):
                    c = choice(delta, finish, True)
                    if kind == "chat" and first:
                        c["delta"]["role"] = "assistant"
                    first = False
                    chunk = {"id": rid, "object": f"{obj}.chunk" if kind == "chat" else obj, "created": created,
                             "model": model_id, "choices": [c]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, n, finish = "", 0, "length"
        for delta, n, fin in run(ids, max_new):
            text += delta
            finish = fin or finish
        return {"id": rid, "object": obj, "created": created, "model": model_id,
                "choices": [choice(text, finish, False)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    async def answer(kind: str, body: dict[str, Any], ids: list[int]) -> Any:
        # generation blocks on the topology's services: off the event loop, so /health stays live
        # (a streamed answer is iterated in Starlette's thread pool for the same reason)
        if body.get("stream"):
            return respond(kind, body, ids)
        return await asyncio.to_thread(respond, kind, body, ids)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
        return bad(str(exc))

    @app.exception_handler(StageDown)
    async def _down(_: Request, exc: StageDown) -> JSONResponse:
        return JSONResponse({"error": {"message": f"the topology cannot answer: {exc}", "type": "service_unavailable"}},
                            status_code=503)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "edgelam"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                             and m.get("role") in ("system", "user", "assistant") for m in msgs):
            raise BadRequest("messages must be a non-empty list of {role: system|user|assistant, content: string}")
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                             add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return await answer("chat", body, ids)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string")
        return await answer("completion", body, list(tokenizer(prompt)["input_ids"]))

    return app
