"""Horizontal collaboration: generation streamed through a chain of module services.

The coordinator (on the device) sends each new token through embed -> block ranges -> head,
one session per generation. Each block stage remembers the inputs it sent; when a service dies
mid-generation the stage switches to another service holding the same range and replays those
inputs in their original chunks, so the rebuilt cache is bit-identical and so is the answer. The
head picks the token: greedy, or sampled there (``sampling.py``) with the random number of (seed,
the token's position), so a failover changes nothing either way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from edgelam.infer.client import SessionLost, Stage, StageDown
from edgelam.infer.push import PushChain
from edgelam.infer.sampling import Sampling


@dataclass
class TokenTiming:
    index: int
    token: int
    seconds: float
    stages: dict[str, float]  # wall seconds per stage (link emulation included)


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    timings: list[TokenTiming] = field(default_factory=list)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    top_probs: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.timings[0].seconds if self.timings else float("nan")

    @property
    def per_token_s(self) -> float:
        rest = [t.seconds for t in self.timings[1:]]
        return sum(rest) / len(rest) if rest else float("nan")


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``, wrapped in the model's chat template (as a user turn) when ``chat``."""
    text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            if chat else prompt)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


class Pipeline:
    def __init__(self, embed: Stage, blocks: list[Stage], head: Stage, adapter: str | None = None,
                 chain: PushChain | None = None) -> None:
        """``chain``: push the block stages server to server (``push.py``) instead of relaying each."""
        self.embed, self.blocks, self.head, self.adapter, self.chain = embed, blocks, head, adapter, chain

    def stages(self) -> list[Stage]:
        return [self.embed, *self.blocks, self.head]

    def fork(self) -> Pipeline:
        """A pipeline over the same transports with its own stage state (histories, failovers, the chain's
        hops): concurrent generations each stream through their own fork."""
        def own(st: Stage) -> Stage:
            return Stage(st.name, st.candidates, st.active, set(st.dead))

        blocks = [own(st) for st in self.blocks]
        chain = PushChain(blocks, self.chain.hop) if self.chain is not None else None
        return Pipeline(own(self.embed), blocks, own(self.head), self.adapter, chain)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
               gen: Generation | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (greedy, or ``sampling``); ``gen`` collects timings and failovers."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        gen = gen if gen is not None else Generation(len(prompt_ids))
        session = uuid.uuid4().hex
        for st in self.blocks:
            st.reset()
        meta = {"session": session, "adapter": self.adapter}
        pos, cur = 0, list(prompt_ids)
        chunks: list[tuple[int, list[int]]] = []  # token chunks sent so far: a fallback to relaying replays them
        fallbacks: list[dict[str, Any]] = []
        if self.chain is not None:
            self.chain.active, self.chain.hops = True, []
        try:
            for i in range(max_new_tokens):
                t0 = time.perf_counter()
                stages: dict[str, float] = {}
                t = time.perf_counter()
                hidden = self.embed.call({"input_ids": torch.tensor([cur])}, meta, stateful=False)["hidden"]
                stages[self.embed.name] = time.perf_counter() - t
                hidden = self._blocks(hidden, meta, pos, chunks, stages, fallbacks)
                chunks.append((pos, cur))
                t = time.perf_counter()
                head_meta = meta if sampling is None else {**meta, "sampling": sampling.meta(pos + len(cur))}
                out = self.head.call({"hidden": hidden[:, -1:]}, head_meta, stateful=False)
                stages[self.head.name] = time.perf_counter() - t
                token = int(out["token_ids"][0, -1])
                gen.tokens.append(token)
                gen.top_probs.append(float(out["top_prob"][0, -1]))
                gen.timings.append(TokenTiming(i, token, time.perf_counter() - t0, stages))
                yield token
                pos, cur = pos + len(cur), [token]
                if eos_id is not None and token == eos_id:
                    break
        finally:
            gen.failovers = [*fallbacks, *(f for st in self.stages() for f in st.failovers)]
            for st in self.blocks:  # a transport's close never raises: a dead service frees its cache anyway
                st.transport.close_session(session)

    def _blocks(self, hidden: torch.Tensor, meta: dict[str, Any], pos: int, chunks: list[tuple[int, list[int]]],
                stages: dict[str, float], fallbacks: list[dict[str, Any]]) -> torch.Tensor:
        """The block stages' output for one chunk: pushed through the chain while it works, else relayed
        stage by stage (after replaying the earlier chunks, so every cache is rebuilt bit-identically)."""
        chain = self.chain
        if chain is not None and chain.active:
            t = time.perf_counter()
            try:
                out = chain.call(hidden, {**meta, "position": pos})
                stages["push chain"] = time.perf_counter() - t
                return out
            except (StageDown, SessionLost) as exc:
                chain.active = False
                fallbacks.append({"stage": "push chain", "from": "push", "to": "relay", "reason": str(exc),
                                  "replayed_chunks": len(chunks)})
                for p, ids in chunks:
                    h = self.embed.call({"input_ids": torch.tensor([ids])}, meta, stateful=False)["hidden"]
                    for st in self.blocks:
                        h = st.call({"hidden": h}, {**meta, "position": p}, stateful=True)["hidden"]
        for st in self.blocks:
            t = time.perf_counter()
            hidden = st.call({"hidden": hidden}, {**meta, "position": pos}, stateful=True)["hidden"]
            stages[st.name] = time.perf_counter() - t
        return hidden

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 sampling: Sampling | None = None) -> Generation:
        gen = Generation(len(prompt_ids))
        for _ in self.stream(prompt_ids, max_new_tokens, eos_id, gen, sampling):
            pass
        return gen
