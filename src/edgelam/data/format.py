"""Chat-template formatting with loss on response tokens only, truncation, and batch collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from edgelam.data.sources import DataError, Example

IGNORE = -100  # label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE on prompt tokens
    task: str


def messages(ex: Example, with_answer: bool = True) -> list[dict[str, str]]:
    """The chat to render: a record's own turns (messages format) or one user turn and the answer.
    Without the answer, everything before the last assistant turn."""
    if ex.turns:
        turns = ex.turns if with_answer else ex.turns[:-1]  # the last turn is the assistant answer
        return [{"role": r, "content": c} for r, c in turns]
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


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text, with the tokenizer's special tokens and an end-of-sequence token (the
    model learns where a document stops, as the chat formats learn the end of a turn)."""
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    eos = tokenizer.eos_token_id
    return ids + [int(eos)] if eos is not None and (not ids or ids[-1] != eos) else ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, ex: Example) -> list[int]:
    """What a model is given to answer ``ex``: the chat up to the answer; for plain text, its first half."""
    if ex.plain:
        ids = [int(i) for i in tokenizer(ex.response)["input_ids"]]
        return ids[: max(1, len(ids) // 2)]
    return _ids(tokenizer, messages(ex, with_answer=False), gen_prompt=True)


def _extends(longer: list[int], prefix: list[int], ex: Example) -> None:
    if longer[: len(prefix)] != prefix:
        raise DataError(f"{ex.origin or 'an example'}: the tokenizer's chat template does not render this chat turn by "
                        f"turn (each turn must extend the tokens of the turns before it), so the loss cannot be "
                        f"placed on the assistant turns")


def _render(ex: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, prompt labels, answer ids): the answer is the last assistant turn; in a
    multi-turn chat the earlier assistant turns (each with its end-of-turn tokens) carry labels
    inside the prompt, everything else is IGNORE."""
    if ex.plain:
        return [], [], _text_ids(tokenizer, ex.response)
    msgs = messages(ex)
    prompt = _ids(tokenizer, msgs[:-1], gen_prompt=True)
    full = _ids(tokenizer, msgs, gen_prompt=False)
    _extends(full, prompt, ex)
    labels = [IGNORE] * len(prompt)
    for j in range(len(msgs) - 1):  # earlier assistant turns (messages format)
        if msgs[j]["role"] != "assistant":
            continue
        before = _ids(tokenizer, msgs[:j], gen_prompt=True)
        through = _ids(tokenizer, msgs[: j + 1], gen_prompt=False)
        _extends(through, before, ex)
        _extends(prompt, through, ex)
        labels[len(before): len(through)] = through[len(before):]
    return prompt, labels, full[len(prompt):]


def encode(ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Token ids of the whole chat and labels that cover only the answers (and their end tokens);
    for plain text (``ex.plain``) labels on every token.

    When too long, the prompt is cut in its middle (its head and its last 8 tokens, the
    assistant header, are kept) so the answer keeps at least half of ``max_length``.
    """
    prompt, prompt_labels, answer = _render(ex, tokenizer)
    answer = answer[: max(max_length - len(prompt), max_length // 2)]
    budget = max_length - len(answer)
    if len(prompt) > budget:
        tail = min(8, budget)
        keep = [*range(budget - tail), *range(len(prompt) - tail, len(prompt))]
        prompt, prompt_labels = [prompt[i] for i in keep], [prompt_labels[i] for i in keep]
    return Encoded(tuple(prompt + answer), tuple(prompt_labels + answer), ex.task)


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
