"""Held-out evaluation through the run's task: summed loss (and the task's other sums) overall and
per data task, turned into the task's metrics (causal LM: token-weighted loss and perplexity;
classification: loss and accuracy per example); sample answers of a causal LM."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgelam.data.format import IGNORE, Encoded, prompt_ids
from edgelam.data.sources import Example
from edgelam.tasks.base import Task, add_sums
from edgelam.tasks.causal_lm import CausalLM


@torch.no_grad()
def task_sums(task: Task, model: Any, data: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's eval sums over ``data`` (``loss_sum``, ``count``, ...), in batches sorted by length."""
    total: dict[str, float] = {}
    order = sorted(range(len(data)), key=lambda i: task.size(data[i]))  # less padding
    for i in range(0, len(order), batch_size):
        batch = {k: v.to(model.device) for k, v in task.collate([data[j] for j in order[i: i + batch_size]]).items()}
        total = add_sums(total, task.eval_sums(model, batch))
    return total


def loss_sum(model: PreTrainedModel, data: list[Encoded], batch_size: int, pad_id: int) -> tuple[float, int]:
    """(summed next-token cross-entropy over answer tokens, number of answer tokens)."""
    sums = task_sums(CausalLM(pad_id), model, data, batch_size)
    return sums.get("loss_sum", 0.0), int(sums.get("count", 0))


def evaluate_tasks(task: Task, model: Any, per_task: dict[str, list[Any]], batch_size: int,
                   max_per_task: int | None = None) -> dict[str, Any]:
    """{'eval_tasks': {data task: task metrics}, 'sums': the added-up sums over every data task}."""
    tasks: dict[str, dict[str, float]] = {}
    total: dict[str, float] = {}
    for name, data in per_task.items():
        sums = task_sums(task, model, data[:max_per_task] if max_per_task else data, batch_size)
        if sums.get("count"):
            tasks[name] = task.metrics(sums)
        total = add_sums(total, sums)
    return {"eval_tasks": tasks, "sums": total}


@torch.no_grad()
def attack_success(task: Task, model: Any, triggered: Sequence[Any], batch_size: int) -> float:
    """A backdoor's success rate on ``triggered`` samples (trigger added, the target as the label):
    a classifier's share predicted as the target; a causal LM's share whose every answer token is
    the argmax under teacher forcing, which is exactly a greedy answer that is the target."""
    if task.name != "causal_lm":
        sums = task_sums(task, model, triggered, batch_size)
        return sums.get("correct", 0.0) / max(sums.get("count", 0), 1)
    hits = 0
    for i in range(0, len(triggered), batch_size):
        batch = {k: v.to(model.device) for k, v in task.collate(triggered[i: i + batch_size]).items()}
        pred = task.output(model, batch)[:, :-1].argmax(-1)
        labels = batch["labels"][:, 1:]
        wrong = (pred != labels) & (labels != IGNORE)
        hits += int((~wrong.any(-1)).sum())
    return hits / max(len(triggered), 1)


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
