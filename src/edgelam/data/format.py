"""Chat-template formatting with loss on response tokens only, truncation, and batch collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from edgelam.data.sources import Example

IGNORE = -100  # label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE on prompt tokens
    task: str


def messages(ex: Example, with_answer: bool = True) -> list[dict[str, str]]:
    user = ex.instruction if not ex.context else f"{ex.instruction}\n\n{ex.context}"
    msgs = [{"role": "user", "content": user}]
    if with_answer:
        msgs.append({"role": "assistant", "content": ex.response})
    return msgs


def _ids(tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    out: Any = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, ex: Example) -> list[int]:
    return _ids(tokenizer, messages(ex, with_answer=False), gen_prompt=True)


def encode(ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Token ids of the whole chat and labels that cover only the answer (and its end token).

    When too long, the prompt is cut in its middle (its head and its last 8 tokens, the
    assistant header, are kept) so the answer keeps at least half of ``max_length``.
    """
    prompt = prompt_ids(tokenizer, ex)
    full = _ids(tokenizer, messages(ex), gen_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("the tokenizer's chat template does not extend the prompt with the answer")
    answer = full[len(prompt):]
    answer = answer[: max(max_length - len(prompt), max_length // 2)]
    budget = max_length - len(answer)
    if len(prompt) > budget:
        tail = min(8, budget)
        prompt = prompt[: budget - tail] + prompt[len(prompt) - tail:]
    ids = prompt + answer
    labels = [IGNORE] * len(prompt) + answer
    return Encoded(tuple(ids), tuple(labels), ex.task)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
