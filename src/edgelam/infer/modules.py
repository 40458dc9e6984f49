"""One functional module of a decoder LM, hosted for inference: the embedding, a block range, or the head.

A block range keeps one KV cache per open session. A request names its session and the position
of its first token: position == the session's length continues it; a smaller position rolls the
cache back to it first (speculative decoding rejects drafted tokens; a replay after a failover
starts at 0); an unknown session must start at 0 (a replacement server rebuilding a cache from the
coordinator's replay). Sessions idle for ``session_ttl_s`` are closed and their cache freed.
LoRA adapters (PEFT folders, e.g. what federated runs write) are loaded by name and chosen per request.

Limits: one request carries at most ``max_request_tokens`` tokens (the causal mask and attention
scores grow as tokens x positions), and a session never runs past the model's
``max_position_embeddings``; both are refused with 413 naming the limit. A request that fails
while a session's cache is being extended drops that session (the next call gets 409: replay it),
so no half-written cache is ever served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from edgelam.infer import sampling
from edgelam.tasks.serving import load_served


class ModuleError(ValueError):
    """A request this module cannot serve (bad shapes, unknown adapter, a session out of step)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModuleSpec:
    kind: str  # embed | blocks | head | full
    start: int = 0
    end: int = 0  # full: 0 = every block; K = the first K blocks and the head (an early-exit draft)

    @staticmethod
    def parse(text: str) -> "ModuleSpec":
        """``embed``, ``head``, ``blocks:A:B`` (blocks A..B-1), ``full`` (the whole model) or ``full:K``
        (embedding, the first K blocks, final norm and LM head: a self-speculative draft)."""
        parts = text.split(":")
        if parts[0] in ("embed", "head", "full") and len(parts) == 1:
            return ModuleSpec(parts[0])
        if parts[0] == "full" and len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
            return ModuleSpec("full", 0, int(parts[1]))
        if parts[0] == "blocks" and len(parts) == 3 and all(p.isdigit() for p in parts[1:]) and int(parts[1]) < int(parts[2]):
            return ModuleSpec("blocks", int(parts[1]), int(parts[2]))
        # no ':A:' style names here: rich would print ':a:' / ':b:' as emoji
        raise ValueError(f"module '{text}' must be embed, head, full, full:K or blocks:START:STOP with START < STOP "
                         f"(blocks START..STOP-1)")

    def __str__(self) -> str:
        if self.kind == "blocks":
            return f"blocks:{self.start}:{self.end}"
        return f"full:{self.end}" if self.kind == "full" and self.end else self.kind


@dataclass
class Session:
    cache: Any
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


def causal_mask(q: int, start: int, dtype: torch.dtype) -> Tensor:
    """(1, 1, q, start + q) additive mask: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(start + q)
    queries = torch.arange(start, start + q).unsqueeze(1)
    mask = torch.zeros(q, start + q, dtype=dtype)
    mask.masked_fill_(keys.unsqueeze(0) > queries, torch.finfo(dtype).min)
    return mask[None, None]


DEFAULT_MAX_REQUEST_TOKENS = 8192


class ModuleHost:
    """Builds the served model through its task (``tasks/serving.py``), keeps only what ``spec``
    needs in use, and serves forward calls. A generating task (a decoder) is served as modules with
    KV-cache sessions; any other task whole (``full``), one stateless batch per request."""

    def __init__(self, model_name: str | None, spec: ModuleSpec, adapters: dict[str, str] | None = None,
                 dtype: str = "float32", session_ttl_s: float = 300.0,
                 max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS) -> None:
        if not session_ttl_s > 0:
            raise ValueError(f"session TTL must be > 0 seconds, got {session_ttl_s}")
        if max_request_tokens < 1:
            raise ValueError(f"max tokens per request must be >= 1, got {max_request_tokens}")
        self.served = served = load_served(model_name, adapters, dtype)
        self.task = served.task
        if not self.task.generates and str(spec) != "full":
            raise ValueError(f"a {self.task.name} model is served whole: --module full (embed, blocks and head "
                             f"modules with KV-cache sessions are for decoders that generate)")
        self.model_name, self.spec, self.session_ttl_s = served.model_name, spec, session_ttl_s
        self.config: Any = getattr(served.base, "config")
        self.num_layers = int(self.config.num_hidden_layers)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)  # 0: no limit known
        self.max_request_tokens = max_request_tokens
        if spec.kind in ("blocks", "full") and spec.end > self.num_layers:
            raise ValueError(f"{spec} exceeds the model's {self.num_layers} blocks")
        self.adapters = served.adapters
        self.layers: list[Any] = []
        if self.task.generates:
            lm: Any = served.base
            self.backbone: Any = lm.model
            self.embed = self.backbone.embed_tokens
            if spec.kind == "blocks":
                self.layers = list(self.backbone.layers)[spec.start: spec.end]
            elif spec.kind == "full":
                self.layers = list(self.backbone.layers)[: spec.end or self.num_layers]
            self.norm, self.lm_head = self.backbone.norm, lm.lm_head
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.stats = {"requests_total": 0, "tokens_total": 0, "errors_total": 0, "sessions_expired_total": 0,
                      "request_seconds_sum": 0.0}

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "module": str(self.spec), "task": self.task.name, **self.task.card(),
                "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "vocab_size": int(self.config.vocab_size), "adapters": self.adapters, "sessions": len(self.sessions),
                "max_position_embeddings": self.max_positions, "max_request_tokens": self.max_request_tokens}

    def expire(self, now: float | None = None) -> int:
        """Close sessions idle for longer than the TTL; returns how many."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [s for s, v in self.sessions.items() if now - v.last_used > self.session_ttl_s]
            for s in old:
                del self.sessions[s]
            self.stats["sessions_expired_total"] += len(old)
        return len(old)

    def close(self, session: str) -> bool:
        with self.lock:
            return self.sessions.pop(session, None) is not None

    def forward(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Run the module; ``errors_total`` is counted by the HTTP service (every error response)."""
        return self._locked(meta.get("adapter"), lambda: self._forward(tensors, meta))

    @torch.no_grad()
    def _locked(self, adapter: Any, fn: Callable[[], Any]) -> Any:
        """``fn()`` under the lock with ``adapter`` active, counted in the stats."""
        t0 = time.perf_counter()
        try:
            self.served.check(adapter)
        except LookupError as exc:
            raise ModuleError(str(exc.args[0])) from None
        with self.lock:
            with self.served.use(adapter):
                out = fn()
            self.stats["requests_total"] += 1
            self.stats["request_seconds_sum"] += time.perf_counter() - t0
            return out

    def _forward(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        kind = self.spec.kind
        if not self.task.generates:
            try:
                batch = self.task.wire_inputs(tensors)
            except ValueError as exc:
                raise ModuleError(f"{self.task.name}: {exc}") from None
            return self._whole(batch, meta), {}
        if kind in ("embed", "full"):
            ids = tensors.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
                raise ModuleError(f"{kind} expects an int32 / int64 tensor 'input_ids' of shape (batch, tokens)")
            if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
                raise ModuleError(f"input_ids must lie in [0, {self.config.vocab_size})")
            self._check_request_tokens(ids.shape[1])
            self.stats["tokens_total"] += ids.numel()
            if kind == "embed":
                return {"hidden": self.embed(ids)}, {}
            out, meta_out = self._blocks(self.embed(ids), meta)
            return self._head(out["hidden"], meta, tensors), meta_out
        hidden = tensors.get("hidden")
        if hidden is None or hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size or not hidden.is_floating_point():
            raise ModuleError(f"{kind} expects a float tensor 'hidden' of shape (batch, tokens, {self.hidden_size})")
        if hidden.shape[1] == 0:
            raise ModuleError(f"{kind} expects at least one token: 'hidden' has shape {tuple(hidden.shape)}")
        self._check_request_tokens(hidden.shape[1])
        if not bool(torch.isfinite(hidden).all()):
            raise ModuleError("'hidden' holds NaN or infinite values")
        self.stats["tokens_total"] += hidden.shape[0] * hidden.shape[1]
        if kind == "head":
            return self._head(hidden, meta, tensors), {}
        return self._blocks(hidden, meta)

    def _check_request_tokens(self, tokens: int) -> None:
        if tokens > self.max_request_tokens:
            raise ModuleError(f"{tokens} tokens in one request exceed this service's limit of {self.max_request_tokens} "
                              f"(edgelam serve --max-request-tokens); send them in smaller chunks", status=413)

    def _check_context(self, pos: int, tokens: int) -> None:
        if self.max_positions and pos + tokens > self.max_positions:
            raise ModuleError(f"position {pos} + {tokens} tokens exceeds the model's context of {self.max_positions} "
                              f"positions (max_position_embeddings)", status=413)

    def _head(self, hidden: Tensor, meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The task's prediction at every position (a decoder's: greedy next token and its
        probability), the last rows sampled when ``meta`` asks (``sampling.py``), the logits on request."""
        logits = self.lm_head(self.norm(hidden)).float()
        out = self.task.predict(logits)
        if meta.get("sampling") is not None:
            try:
                out = sampling.at_head(logits, meta["sampling"], tensors, out)
            except ValueError as exc:
                raise ModuleError(f"sampling: {exc}") from None
        if meta.get("return_logits"):
            out["logits"] = logits
        return out

    def _whole(self, batch: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
        """One stateless batch through the whole model and the task's ``predict`` (logits on request)."""
        tokens = self.task.tokens(batch)
        self._check_request_tokens(tokens)
        if "input_ids" in batch:
            ids = batch["input_ids"]
            self._check_context(0, ids.shape[1])
            if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
                raise ModuleError(f"input_ids must lie in [0, {self.config.vocab_size})")
        self.stats["tokens_total"] += tokens
        output = self.task.output(self.served.model, batch)
        out = self.task.predict(output)
        if meta.get("return_logits"):
            out["logits"] = output.float()
        return out

    def predict(self, inputs: list[Any], adapter: str | None = None, truncate: bool = False) -> list[dict[str, Any]]:
        """Answers to raw inputs (texts, CSI arrays), one per input, as the task gives them: the whole model
        (``full``) on one batch; an input over the model's context is refused unless ``truncate``."""
        if str(self.spec) != "full":
            raise ModuleError(f"predictions need the whole model: this service hosts {self.spec}; "
                              f"start one with --module full")
        limit = self.max_positions or self.max_request_tokens
        try:
            batch = self.task.request(self.served.tokenizer, inputs, limit if truncate else limit + 1)
        except ValueError as exc:
            raise ModuleError(f"inputs: {exc}") from None
        longest = int(batch["attention_mask"].sum(dim=1).max()) if "attention_mask" in batch else 0
        if longest > limit:
            raise ModuleError(f"an input has more than {limit} tokens, the model's context; shorten it or send "
                              f"\"truncate\": true", status=413)
        out = self._locked(adapter, lambda: self._whole(batch, {}))
        return self.task.answers(out, batch, self.served.tokenizer)

    def _blocks(self, hidden: Tensor, meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        sid = meta.get("session")
        pos = meta.get("position", 0)
        if not isinstance(sid, str) or not sid or type(pos) is not int or pos < 0:  # JSON true is no position
            raise ModuleError("blocks need metadata 'session' (a non-empty string) and 'position' (an integer >= 0)")
        if hidden.shape[0] != 1:
            raise ModuleError("sessions hold one sequence: 'hidden' must have batch size 1")
        self._check_context(pos, hidden.shape[1])
        sess = self._session_at(sid, pos)
        try:
            return self._extend(sess, hidden, pos)
        except Exception:  # a half-extended cache must never be served: drop it, the caller replays
            self.sessions.pop(sid, None)
            raise

    def _session_at(self, sid: str, pos: int) -> Session:
        """The session ``sid`` rolled back to ``pos`` (opened when new); 409 if that would leave a gap."""
        from transformers import DynamicCache

        sess = self.sessions.get(sid)
        if sess is None:
            if pos != 0:
                raise ModuleError(f"session '{sid}' is unknown here (expired or never opened); replay it from position 0",
                                  status=409)
            sess = self.sessions[sid] = Session(DynamicCache(config=self.config))
        elif pos > sess.length:
            raise ModuleError(f"session '{sid}' holds {sess.length} tokens; position {pos} would leave a gap", status=409)
        elif pos < sess.length:  # roll back (rejected draft tokens, or a replay from 0)
            if pos == 0:
                sess.cache = DynamicCache(config=self.config)
            else:
                sess.cache.crop(pos - sess.length)  # a negative count: drop that many tokens
            sess.length = pos
        return sess

    def _extend(self, sess: Session, hidden: Tensor, pos: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        q = hidden.shape[1]
        positions = torch.arange(pos, pos + q).unsqueeze(0)
        pe = self.backbone.rotary_emb(hidden, position_ids=positions)
        mask = causal_mask(q, pos, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=sess.cache,
                           use_cache=True, position_embeddings=pe)
        sess.length = pos + q
        sess.last_used = time.monotonic()
        return {"hidden": hidden}, {"length": sess.length}
