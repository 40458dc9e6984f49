"""Held-out evaluation: token-weighted loss and perplexity, overall and per task; sample answers."""

from __future__ import annotations

import math
import typing
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgelam.data.format import IGNORE, Encoded, collate, prompt_ids
from edgelam.data.sources import Example


@torch.no_grad()
def loss_sum(model: PreTrainedModel, data: list[Encoded], batch_size: int, pad_id: int) -> tuple[float, int]:
    """(summed next-token cross-entropy over answer tokens, number of answer tokens)."""
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))  # less padding
    for i in range(0, len(order), batch_size):
        batch = {k: v.to(model.device) for k, v in collate([data[j] for j in order[i: i + batch_size]], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total, count


def evaluate_tasks(model: PreTrainedModel, per_task: dict[str, list[Encoded]], batch_size: int, pad_id: int,
                   max_per_task: int | None = None) -> dict[str, Any]:
    """{'eval_loss', 'eval_ppl', 'eval_tasks': {task: {'loss', 'ppl'}}, 'loss_sum', 'tokens'}, token-weighted."""
    tasks: dict[str, dict[str, float]] = {}
    total, count = 0.0, 0
    for task, data in per_task.items():
        s, n = loss_sum(model, data[:max_per_task] if max_per_task else data, batch_size, pad_id)
        if n:
            tasks[task] = {"loss": s / n, "ppl": math.exp(min(s / n, 50.0))}
        total, count = total + s, count + n
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tasks": tasks, "loss_sum": total, "tokens": count}


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                     max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to a few prompts, for a look at what the adapter learned."""
    out = []
    for ex in examples:
        ids = torch.tensor([prompt_ids(tokenizer, ex)], device=model.device)
        gen = typing.cast(Any, model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = str(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        out.append({"task": ex.task, "instruction": ex.instruction, "reference": ex.response, "answer": text})
    return out
