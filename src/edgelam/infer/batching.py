"""Continuous batching in a module service: concurrent sessions' decode steps share one forward.

A service runs its model in one thread (``Batcher``). Requests that arrive while it computes wait
in a queue; when it is free it takes all of them (at most ``max_batch``), and the decode steps
among them (one new token of an open session, ``blocks`` or ``full`` modules of a decoder) run
as one batch per adapter: sessions join and leave between steps, as in Orca / vLLM's continuous
batching. Everything else (a prompt, a rollback, a new session, a prediction, a malformed
request) runs alone on the usual path, so its answer and its error are exactly as without
batching; a step that is alone in the queue also runs alone.

In a batched step each session keeps its own KV cache and position: the new key and value rows go
into each session's own cache (``StepCache``), attention reads every session's keys right-padded
to the longest with the padding masked, and the rotary embedding takes each row's own position.
The batch's matrix products have more rows than one session's, so results may differ from the
one-session path in the last bits (as in every batching server); tests check that greedy tokens
are the same.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

Request = tuple[dict[str, Tensor], dict[str, Any]]


class StepCache:
    """The cache one batched decode step sees: layer ``i``'s new rows go to each session's own cache,
    and attention gets all sessions' keys / values right-padded to the longest."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        got = [c.update(key[b: b + 1], value[b: b + 1], layer_idx) for b, c in enumerate(self.caches)]
        longest = max(k.shape[2] for k, _ in got)

        def pad(t: Tensor) -> Tensor:
            return F.pad(t, (0, 0, 0, longest - t.shape[2]))

        return torch.cat([pad(k) for k, _ in got]), torch.cat([pad(v) for _, v in got])


def step_mask(positions: list[int], dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, max + 1) additive mask: row b (its new token at ``positions[b]``) sees keys 0..positions[b]."""
    keys = torch.arange(max(positions) + 1)
    mask = torch.zeros(len(positions), 1, 1, len(keys), dtype=dtype)
    mask.masked_fill_(keys[None, None, None, :] > torch.tensor(positions)[:, None, None, None], torch.finfo(dtype).min)
    return mask


def decode_step(layers: list[Any], rotary: Any, hidden: Tensor, caches: list[Any], positions: list[int]) -> Tensor:
    """One new token per session (``hidden``: (B, 1, d)) through ``layers``; each cache grows by one."""
    pos = torch.tensor(positions).unsqueeze(1)
    pe = rotary(hidden, position_ids=pos)
    mask = step_mask(positions, hidden.dtype)
    cache = StepCache(caches)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       position_embeddings=pe)
    return hidden


def batchable(host: Any, tensors: dict[str, Tensor], meta: dict[str, Any]) -> bool:
    """A well-formed decode step of an open session at its end (what a batch may hold); anything else,
    errors included, takes the one-request path."""
    if not host.task.generates or host.spec.kind not in ("blocks", "full") or meta.get("push") or meta.get("return_logits"):
        return False
    sid, pos = meta.get("session"), meta.get("position", 0)
    sess = host.sessions.get(sid) if isinstance(sid, str) else None
    if sess is None or type(pos) is not int or pos != sess.length or pos < 1 or (
            host.max_positions and pos + 1 > host.max_positions):
        return False
    if host.spec.kind == "full":
        ids = tensors.get("input_ids")
        return (ids is not None and ids.shape == (1, 1) and ids.dtype in (torch.int32, torch.int64)
                and 0 <= int(ids[0, 0]) < host.config.vocab_size)
    h = tensors.get("hidden")
    return (h is not None and h.shape == (1, 1, host.hidden_size) and h.is_floating_point()
            and bool(torch.isfinite(h).all()))


def decode_many(host: Any, reqs: list[Request]) -> list[Any]:
    """The batched step of ``reqs`` (one adapter; call under the host's lock with it active): each request's
    answer or its own exception; None for a request that is no longer batchable (its session changed
    meanwhile): run it alone."""
    ok = [batchable(host, t, m) for t, m in reqs]
    idx = [i for i, good in enumerate(ok) if good]
    out: list[Any] = [None] * len(reqs)
    if len(idx) < 2:
        return out
    metas = [reqs[i][1] for i in idx]
    sessions = [host.sessions[m["session"]] for m in metas]
    positions = [int(m["position"]) for m in metas]
    if host.spec.kind == "full":
        hidden = host.embed(torch.cat([reqs[i][0]["input_ids"] for i in idx]).long())
    else:
        hidden = torch.cat([reqs[i][0]["hidden"] for i in idx])
    try:
        hidden = decode_step(host.layers, host.backbone.rotary_emb, hidden, [s.cache for s in sessions], positions)
    except Exception:  # half-extended caches must never be served: drop them, the callers replay
        for m in metas:
            host.sessions.pop(m["session"], None)
        raise
    now = time.monotonic()
    for b, (i, sess, p) in enumerate(zip(idx, sessions, positions)):
        sess.length, sess.last_used = p + 1, now  # as on the one-request path, a head error leaves the step cached
        row = hidden[b: b + 1]
        try:
            result = {"hidden": row} if host.spec.kind == "blocks" else host._head(row, reqs[i][1], reqs[i][0])
            out[i] = (result, {"length": p + 1})
        except Exception as exc:  # noqa: BLE001 - this request's own error (a bad sampling field)
            out[i] = exc
    host.stats["tokens_total"] += len(idx)
    host.stats["requests_total"] += len(idx) - 1  # _locked counted the batch once
    host.stats["batched_requests_total"] = host.stats.get("batched_requests_total", 0) + len(idx)
    host.stats["batches_total"] = host.stats.get("batches_total", 0) + 1
    return out


def forward_many(host: Any, reqs: list[Request]) -> list[Any]:
    """Each request's (tensors, meta) answer, or the exception it raised: decode steps batched per
    adapter, the rest one by one."""
    results: list[Any] = [None] * len(reqs)
    groups: dict[Any, list[int]] = {}
    seen: set[Any] = set()
    for i, (t, m) in enumerate(reqs):
        sid = m.get("session")
        if batchable(host, t, m) and sid not in seen:
            seen.add(sid)
            groups.setdefault(m.get("adapter"), []).append(i)
    for adapter, idx in groups.items():
        if len(idx) < 2:
            continue
        try:
            got = host._locked(adapter, lambda: decode_many(host, [reqs[i] for i in idx]))
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            got = [exc] * len(idx)
        for i, r in zip(idx, got):
            results[i] = r
    for i, (t, m) in enumerate(reqs):
        if results[i] is None:
            try:
                results[i] = host.forward(t, m)
            except Exception as exc:  # noqa: BLE001 - handed to the request
                results[i] = exc
    return results


class Batcher:
    """The service's model thread: takes every forward request queued while it was busy (at most
    ``max_batch``) and answers them through ``forward_many``; other work (``call``) runs alone, in order."""

    def __init__(self, host: Any, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {max_batch}")
        self.host, self.max_batch = host, max_batch
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="edgelam-model", daemon=True).start()

    async def forward(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return await self._submit(("forward", tensors, meta))  # type: ignore[no-any-return]

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._submit(("call", fn, args))

    async def _submit(self, work: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((work, fut, loop))
        return await fut

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            forwards = [it for it in items if it[0][0] == "forward"]
            results = forward_many(self.host, [(w[1], w[2]) for w, _, _ in forwards]) if forwards else []
            answers = dict(zip(map(id, forwards), results))
            for it in items:
                (kind, *rest), fut, loop = it
                if kind == "forward":
                    res = answers[id(it)]
                else:
                    try:
                        res = rest[0](*rest[1])
                    except Exception as exc:  # noqa: BLE001 - handed to the request
                        res = exc
                loop.call_soon_threadsafe(_settle, fut, res)


def _settle(fut: asyncio.Future[Any], res: Any) -> None:
    if fut.done():  # the request was cancelled (client gone)
        return
    if isinstance(res, BaseException):
        fut.set_exception(res)
    else:
        fut.set_result(res)
