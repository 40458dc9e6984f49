"""The front door: an OpenAI-compatible API in front of any topology (pipeline, speculative, ...).

    POST /v1/chat/completions   {model, messages, max_tokens | max_completion_tokens, stream, temperature,
                                 top_p, top_k, seed, stop}
    POST /v1/completions        {model, prompt, max_tokens, stream, temperature, top_p, top_k, seed, stop}
    GET  /v1/models, /health
Streaming answers are server-sent events (``data: {chunk}`` ... ``data: [DONE]``) in OpenAI's
chunk format, so the ``openai`` Python client works unchanged (``base_url=.../v1``). Decoding is
greedy unless ``temperature`` > 0 (absent: 0, or 1 when top_p < 1 or top_k > 0 ask for sampling);
then the topology samples where the logits are (``sampling.py``), the same ``seed`` giving the same
text (no seed: a random one). ``top_k`` (not OpenAI's; HF's and vLLM's) is an extra body field. ``stop``
(``stops.py``) ends the answer before the first stop sequence, finish_reason ``stop``.

Limits and errors: 400 for a malformed request, an option out of its range (OpenAI's error with
``param`` naming the field), ``max_tokens`` above the gateway's cap, or a prompt (+ max_tokens)
longer than the model's context; 404 for another ``model``; 413 for a body over 8 MB; 503 when the
topology cannot answer (a stream cut mid-way ends with an SSE ``error`` event instead of ``[DONE]``);
500 with ``Connection: close`` for anything unexpected; 502 when a link to a service fails its integrity check (``IntegrityError``).
With API keys (``create_gateway(api_keys=...)``, ``edgelam gateway --api-keys FILE``) every request
but ``/health`` needs ``Authorization: Bearer <key>``: 401 without or malformed, 403 for a wrong key
(``security/bearer.py``). ``/health`` is 503 ``degraded`` while some module has no live service. More than
``--max-concurrent`` requests in flight: 503 with Retry-After (``limits.py``).
Up to ``generations`` (``edgelam gateway --generations N``, default 16) generations run at once, so the
services behind see concurrent sessions and batch their decode steps (``batching.py``); more wait
for a slot. Each runs in a worker thread that stops at the next token when its client goes away,
so a dropped stream frees its slot at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgelam.infer import openapi
from edgelam.infer.client import StageDown
from edgelam.infer.limits import DEFAULT_GATEWAY_MAX_CONCURRENT, ConcurrencyLimit
from edgelam.infer.modules import ModuleError
from edgelam.infer.sampling import Sampling
from edgelam.infer.sampling import check as check_sampling
from edgelam.infer.service import BodyTooLarge, ErrorGuard, read_limited
from edgelam.infer.stops import parse_stops, visible
from edgelam.security.bearer import BearerGuard
from edgelam.security.mac import IntegrityError

# a backend turns (prompt token ids, max new tokens, eos id[, sampling=Sampling]) into a stream of token ids;
# greedy requests call it with the first three only
Backend = Callable[..., Iterator[int]]
# names of the modules that have no live service left (empty: healthy)
Health = Callable[[], list[str]]
MAX_REQUEST_BYTES = 8 * 1024 * 1024
Item = tuple[str, int, str | None]  # (text delta, tokens so far, finish reason or None)


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class GatewayState:
    backend: Backend
    tokenizer: Any
    model_id: str
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024
    context_tokens: int | None = None  # the model's max_position_embeddings
    health: Health | None = None
    generations: int = 16  # generations at once: the services batch their decode steps (infer/batching.py)
    slots: threading.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise ValueError(f"generations must be >= 1, got {self.generations}")
        self.slots = threading.Semaphore(self.generations)


def openai_error(message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def failure(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-style error body for a failed request."""
    if isinstance(exc, BadRequest):
        return exc.status, openai_error(str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, BodyTooLarge):
        return 413, openai_error(str(exc))
    if isinstance(exc, StageDown):
        return 503, openai_error(f"the topology cannot answer: {exc}", "service_unavailable")
    if isinstance(exc, IntegrityError):
        return 502, openai_error(f"a link to a service failed its integrity check: {exc}", "link_integrity_error")
    if isinstance(exc, ModuleError) and exc.status < 500:
        return 400, openai_error(f"a service refused the request: {exc}")
    return 500, openai_error(f"internal error: {type(exc).__name__}: {exc}", "server_error")


def failure_response(exc: Exception) -> JSONResponse:
    status, body = failure(exc)
    # a body left unread (413) or an unexpected failure: do not reuse the connection
    return JSONResponse(body, status_code=status, headers={"connection": "close"} if status in (413, 500) else None)


# --- request checks ---

@dataclass(frozen=True)
class Options:
    sampling: Sampling | None  # None: greedy
    stops: tuple[str, ...] = ()


def check_options(body: dict[str, Any], model_id: str) -> Options:
    """The decoding options (sampling, stop sequences); ``stream`` a boolean; ``n`` 1; ``model`` absent or
    the one served. A bad value is a 400 naming the field and its range."""
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadRequest("n must be 1", param="n")
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise BadRequest(f"stream must be true or false, got {json.dumps(body['stream'])}", param="stream")
    try:
        stops = parse_stops(body.get("stop"))
    except ValueError as exc:
        raise BadRequest(str(exc), param="stop") from None
    if body.get("model") not in (None, model_id):
        raise BadRequest(f"the model '{body['model']}' does not exist here; this gateway serves '{model_id}'", 404,
                         "model_not_found", "model")
    return Options(sampling_of(body), stops)


def sampling_of(body: dict[str, Any]) -> Sampling | None:
    """OpenAI's temperature (0: greedy; absent: greedy, unless top_p < 1 or top_k > 0 ask for sampling at
    OpenAI's default of 1), top_p, seed (absent: a random one) and the extra top_k."""
    given = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if body.get(k) is not None}
    for key, value in given.items():
        problem = check_sampling(key, value)
        if problem:
            raise BadRequest(problem, param=key)
    filtered = given.get("top_p", 1) < 1 or given.get("top_k", 0) > 0
    temperature = given.get("temperature", 1.0 if filtered else 0)
    if temperature == 0:
        return None
    return Sampling(temperature, given.get("top_p", 1.0), given.get("top_k", 0), given.get("seed", secrets.randbits(63)))


def max_new_tokens(body: dict[str, Any], st: GatewayState, prompt_tokens: int) -> int:
    """max_tokens as asked (at most the gateway's cap), or the default; the prompt and the answer must
    fit the model's context."""
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        raise BadRequest("max_tokens must be a positive integer")
    if asked is not None and asked > st.max_tokens_limit:
        raise BadRequest(f"max_tokens {asked} exceeds this gateway's limit of {st.max_tokens_limit} "
                         f"(edgelam gateway --max-tokens-limit)")
    ctx = st.context_tokens
    if ctx and prompt_tokens >= ctx:
        raise BadRequest(f"the prompt has {prompt_tokens} tokens; this model's context is {ctx} tokens "
                         f"(max_position_embeddings): shorten the prompt", code="context_length_exceeded")
    if ctx and asked is not None and prompt_tokens + asked > ctx:
        raise BadRequest(f"the prompt's {prompt_tokens} tokens + max_tokens {asked} exceed this model's context of "
                         f"{ctx} tokens: ask for at most {ctx - prompt_tokens}", code="context_length_exceeded")
    n = st.default_max_tokens if asked is None else asked
    return min(n, ctx - prompt_tokens) if ctx else n


async def body_of(request: Request) -> dict[str, Any]:
    raw = await read_limited(request, MAX_REQUEST_BYTES)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def chat_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         and m.get("role") in ("system", "user", "assistant") for m in msgs):
        raise BadRequest("messages must be a non-empty list of {role: system|user|assistant, content: string}")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string")
    return list(tokenizer(prompt)["input_ids"])


# --- generation ---

def decode(st: GatewayState, ids: list[int], max_new: int, cancel: threading.Event,
           opts: Options = Options(None)) -> Iterator[Item]:
    """Text deltas as tokens arrive, in one of the gateway's generation slots; stops at the next token once ``cancel`` is
    set, and at the first stop sequence (text that could begin one is held back: ``stops.py``)."""
    eos = st.tokenizer.eos_token_id
    out: list[int] = []
    shown = 0  # characters of the answer sent so far
    finish = "length"
    with st.slots:
        tokens = (st.backend(ids, max_new, eos) if opts.sampling is None
                  else st.backend(ids, max_new, eos, sampling=opts.sampling))
        try:
            for tok in tokens:
                if cancel.is_set():
                    return
                if tok == eos:
                    finish = "stop"
                    break
                out.append(tok)
                full = st.tokenizer.decode(out, skip_special_tokens=True)
                if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                end, stopped = visible(full, opts.stops)
                if stopped:
                    yield full[shown:end], len(out), "stop"
                    return
                yield full[shown:end], len(out), None
                shown = end
        finally:
            getattr(tokens, "close", lambda: None)()  # ends the backend's session now, not at garbage collection
    full = st.tokenizer.decode(out, skip_special_tokens=True)
    end, stopped = visible(full, opts.stops, final=True)
    yield full[shown:end], len(out), "stop" if stopped else finish


async def generate(st: GatewayState, ids: list[int], max_new: int, opts: Options = Options(None)
                   ) -> AsyncGenerator[Item, None]:
    """``decode`` in a worker thread (the services block; the event loop must not). Leaving this
    iterator early (a client gone, a cancelled task) tells the worker to stop and free its slot."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def put(item: Any) -> None:
        if not cancel.is_set():
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            for item in decode(st, ids, max_new, cancel, opts):
                put(item)
        except Exception as exc:  # handed to the request, which answers with the right status
            put(exc)
        put(done)

    threading.Thread(target=work, name="edgelam-generate", daemon=True).start()
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()


# --- responses ---

@dataclass(frozen=True)
class Reply:
    kind: str  # chat | completion
    model_id: str
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.rid}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def choice(self, text: str, finish: str | None, streaming: bool) -> dict[str, Any]:
        if self.kind == "chat":
            key = "delta" if streaming else "message"
            msg = {"content": text} if streaming else {"role": "assistant", "content": text}
            return {"index": 0, key: msg, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def chunk(self, delta: str, finish: str | None, first: bool) -> str:
        c = self.choice(delta, finish, True)
        if self.kind == "chat" and first:
            c["delta"]["role"] = "assistant"
        obj = f"{self.object}.chunk" if self.kind == "chat" else self.object
        return "data: " + json.dumps({"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                                      "choices": [c]}) + "\n\n"


async def sse(reply: Reply, first: Item, rest: AsyncIterator[Item]) -> AsyncIterator[str]:
    """The chunks, then ``[DONE]``; a failure mid-stream ends with an ``error`` event instead."""
    yield reply.chunk(first[0], first[2], True)
    try:
        async for delta, _, finish in rest:
            yield reply.chunk(delta, finish, False)
    except Exception as exc:
        yield f"data: {json.dumps(failure(exc)[1])}\n\n"
        return
    yield "data: [DONE]\n\n"


async def answer(st: GatewayState, kind: str, body: dict[str, Any], ids: list[int]) -> Any:
    opts = check_options(body, st.model_id)
    max_new = max_new_tokens(body, st, len(ids))
    reply = Reply(kind, st.model_id)
    items = generate(st, ids, max_new, opts)
    if body.get("stream"):
        try:  # the first token before the headers: an error up to here still gets its own status
            first = await anext(items)
        except BaseException:
            await items.aclose()
            raise
        return StreamingResponse(sse(reply, first, items), media_type="text/event-stream")
    text, n, finish = "", 0, "length"
    async for delta, n, fin in items:
        text += delta
        finish = fin or finish
    return {"id": reply.id, "object": reply.object, "created": reply.created, "model": st.model_id,
            "choices": [reply.choice(text, finish, False)],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}


# --- handlers ---

def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def chat(request: Request) -> Any:
    st = state_of(request)
    try:
        body = await body_of(request)
        return await answer(st, "chat", body, chat_ids(body, st.tokenizer))
    except (BadRequest, BodyTooLarge, StageDown, ModuleError, IntegrityError) as exc:
        return failure_response(exc)


async def completions(request: Request) -> Any:
    st = state_of(request)
    try:
        body = await body_of(request)
        return await answer(st, "completion", body, completion_ids(body, st.tokenizer))
    except (BadRequest, BodyTooLarge, StageDown, ModuleError, IntegrityError) as exc:
        return failure_response(exc)


def health(request: Request) -> JSONResponse:
    st = state_of(request)
    dead = st.health() if st.health else []
    if dead:
        return JSONResponse({"status": "degraded", "dead": dead}, status_code=503)
    return JSONResponse({"status": "ok"})


def models(request: Request) -> dict[str, Any]:
    model_id = state_of(request).model_id
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "edgelam"}]}


def create_gateway(backend: Backend, tokenizer: Any, model_id: str, default_max_tokens: int = 64,
                   max_tokens_limit: int = 1024, context_tokens: int | None = None,
                   health_check: Health | None = None, api_keys: dict[str, str] | None = None,
                   max_concurrent: int = DEFAULT_GATEWAY_MAX_CONCURRENT, generations: int = 16) -> FastAPI:
    """The gateway app; ``context_tokens`` (the model's context) bounds prompt + max_tokens, ``health_check``
    names the modules with no live service; ``api_keys`` (name -> key), when given, are the bearer tokens
    every request but /health must carry; ``generations``: how many generations run at once."""
    app = FastAPI(title=f"EdgeLAM gateway ({model_id})")
    app.state.gateway = GatewayState(backend, tokenizer, model_id, default_max_tokens, max_tokens_limit,
                                     context_tokens, health_check, generations)
    app.add_middleware(ConcurrencyLimit, max_concurrent=max_concurrent, flag="edgelam gateway --max-concurrent",
                       render=lambda m: openai_error(m, "service_unavailable", "too_many_requests"))
    app.add_middleware(ErrorGuard, render=lambda m: openai_error(m, "server_error"))
    if api_keys:
        app.add_middleware(BearerGuard, api_keys=api_keys)  # outermost: refused before anything else runs
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"], openapi_extra=openapi.CHAT)
    app.add_api_route("/v1/completions", completions, methods=["POST"], openapi_extra=openapi.COMPLETION)
    return app
