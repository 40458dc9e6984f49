"""Horizontal collaboration: greedy generation streamed through a chain of module services.

The coordinator (on the device) sends each new token through embed -> block ranges -> head,
one session per generation. Each block stage remembers the inputs it sent; when a service dies
mid-generation the stage switches to another service holding the same range and replays those
inputs in their original chunks, so the rebuilt cache is bit-identical and so is the answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from edgelam.infer.client import Stage


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
    def __init__(self, embed: Stage, blocks: list[Stage], head: Stage, adapter: str | None = None) -> None:
        self.embed, self.blocks, self.head, self.adapter = embed, blocks, head, adapter

    def stages(self) -> list[Stage]:
        return [self.embed, *self.blocks, self.head]

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
               gen: Generation | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (greedy); ``gen`` collects timings and failovers."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        gen = gen if gen is not None else Generation(len(prompt_ids))
        session = uuid.uuid4().hex
        for st in self.blocks:
            st.reset()
        meta = {"session": session, "adapter": self.adapter}
        pos, cur = 0, list(prompt_ids)
        try:
            for i in range(max_new_tokens):
                t0 = time.perf_counter()
                stages: dict[str, float] = {}
                t = time.perf_counter()
                hidden = self.embed.call({"input_ids": torch.tensor([cur])}, meta, stateful=False)["hidden"]
                stages[self.embed.name] = time.perf_counter() - t
                for st in self.blocks:
                    t = time.perf_counter()
                    hidden = st.call({"hidden": hidden}, {**meta, "position": pos}, stateful=True)["hidden"]
                    stages[st.name] = time.perf_counter() - t
                t = time.perf_counter()
                out = self.head.call({"hidden": hidden[:, -1:]}, meta, stateful=False)
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
            gen.failovers = [f for st in self.stages() for f in st.failovers]
            for st in self.blocks:  # a transport's close never raises: a dead service frees its cache anyway
                st.transport.close_session(session)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> Generation:
        gen = Generation(len(prompt_ids))
        for _ in self.stream(prompt_ids, max_new_tokens, eos_id, gen):
            pass
        return gen
