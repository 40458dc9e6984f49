"""A client's local LoRA training: AdamW, warm-up + schedule, clipping, accumulation, FedProx term.
What a batch is, its loss and its cost come from the run's task (``tasks/``); causal LM by default."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor

from edgelam.config import TrainConfig
from edgelam.models.flops import FlopModel
from edgelam.models.lora import AdapterState, get_adapter_state, set_adapter_state
from edgelam.tasks.base import Task
from edgelam.tasks.causal_lm import CausalLM


@dataclass(frozen=True)
class ClientUpdate:
    client: int
    state: AdapterState
    num_samples: int
    train_loss: float  # mean loss over the local steps
    steps: int
    tokens: int  # padded tokens processed (what the hardware computed)
    flops: float
    adapter: str = "global"  # the adapter (cluster) it started from
    unsent: frozenset[str] = frozenset()  # adapter keys not trained, not sent (another task's head)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at step s: linear warm-up, then constant / linear / cosine decay to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def batches(data: Sequence[Any], batch_size: int, generator: torch.Generator) -> Iterator[list[Any]]:
    """Endless shuffled mini-batches, a new permutation each pass over the data."""
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i: i + batch_size]]


def num_local_steps(cfg: TrainConfig, n: int) -> int:
    if cfg.local_epochs is None:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(n / (cfg.batch_size * cfg.grad_accum))


def local_train(model: PeftModel, global_state: AdapterState, data: Sequence[Any], cfg: TrainConfig,
                prox_mu: float, seed: int, pad_id: int, fm: FlopModel, client: int = 0, task: Task | None = None) -> ClientUpdate:
    """Start from ``global_state``, train on ``data`` (the task's samples), return the new adapter
    state and what it cost. ``task`` None: causal LM with ``pad_id`` (``pad_id`` is unused otherwise)."""
    if not data:
        raise ValueError(f"client {client} has no training data; use fewer clients or another data.partition")
    task = task or CausalLM(pad_id)
    set_adapter_state(model, global_state)
    # a task may leave some of the adapter untrained by this client's data (a multi-task model's other heads)
    skip = tuple(getattr(task, "untrained")(data)) if hasattr(task, "untrained") else ()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not any(f in n for f in skip)]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else []
    total = num_local_steps(cfg, len(data))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout
    stream = batches(data, cfg.batch_size, gen)
    losses: list[float] = []
    tokens, flops = 0, 0.0
    model.train()
    # --- local steps ---
    for _ in range(total):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(model.device) for k, v in task.collate(next(stream)).items()}
            task_loss: Tensor = task.loss(model, batch)
            loss = task_loss / cfg.grad_accum
            if prox_mu > 0:
                loss = loss + (prox_mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor)) / cfg.grad_accum
            loss.backward()
            step_loss += float(task_loss.detach()) / cfg.grad_accum
            tokens += task.tokens(batch)
            flops += task.work_flops(fm, batch)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(step_loss)
    model.eval()
    state = get_adapter_state(model)
    unsent = frozenset(k for k in state if any(f in k for f in skip))
    return ClientUpdate(client=client, state={k: v for k, v in state.items() if k not in unsent}, num_samples=len(data),
                        train_loss=sum(losses) / len(losses), steps=total, tokens=tokens, flops=flops, unsent=unsent)
