"""A client's local LoRA training: AdamW, warm-up + schedule, clipping, accumulation, FedProx term,
and optionally sample-level DP-SGD (Abadi et al. 2016; ``privacy/dpsgd.py``) in place of the plain
gradient. What a batch is, its loss and its cost come from the run's task (``tasks/``); causal LM by
default. ``trip_steps`` draws a trip's batches from its seed; the executor's FLOP plan replays it."""

from __future__ import annotations

import contextlib
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
from edgelam.privacy.dpsgd import DPSGD, PerExample, clip_per_example, noise_generator, noised_mean, per_example_grads
from edgelam.privacy.dpsgd import poisson_sample, sample_rate
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
    # DP-SGD: (sample rate q, noise multiplier sigma, steps) of the trip, for the accountant to compose
    # PoissonSampled(q, Gaussian(sigma)) that many times; () without DP-SGD
    dp_steps: tuple[tuple[float, float, int], ...] = ()


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


def trip_steps(data: Sequence[Any], cfg: TrainConfig, seed: int,
               dpsgd: DPSGD | None = None) -> Iterator[list[list[Any]]]:
    """Each local step's batches (what one forward / backward pass sees), drawn from ``seed``.
    Plain: ``grad_accum`` shuffled mini-batches. DP-SGD: one Poisson sample of rate
    q = batch_size * grad_accum / n (``privacy.dpsgd.sample_rate``), in pieces of at most
    ``batch_size`` examples; none when the draw is empty (a step of noise only)."""
    gen = torch.Generator().manual_seed(seed)
    total = num_local_steps(cfg, len(data))
    if dpsgd is None:
        stream = batches(data, cfg.batch_size, gen)
        for _ in range(total):
            yield [next(stream) for _ in range(cfg.grad_accum)]
        return
    rate = sample_rate(cfg.batch_size * cfg.grad_accum, len(data))
    for _ in range(total):
        drawn = [data[j] for j in poisson_sample(len(data), rate, gen)]
        yield [drawn[i: i + cfg.batch_size] for i in range(0, len(drawn), cfg.batch_size)]


def local_train(model: PeftModel, global_state: AdapterState, data: Sequence[Any], cfg: TrainConfig,
                prox_mu: float, seed: int, pad_id: int, fm: FlopModel, client: int = 0, task: Task | None = None,
                dpsgd: DPSGD | None = None) -> ClientUpdate:
    """Start from ``global_state``, train on ``data`` (the task's samples), return the new adapter
    state and what it cost. ``task`` None: causal LM with ``pad_id`` (``pad_id`` is unused otherwise).
    ``dpsgd``: each step's gradient is DP-SGD's noised mean of clipped per-example gradients (over a
    Poisson batch); FedProx's term and ``max_grad_norm`` act on it after the noise (they do not read
    the data, so they are post-processing and cost no privacy)."""
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
    torch.manual_seed(seed)  # LoRA dropout
    noise = noise_generator(seed) if dpsgd else None
    losses: list[float] = []
    tokens, flops = 0, 0.0
    model.train()
    # --- local steps ---
    with per_example_grads(model, task, params) if dpsgd else contextlib.nullcontext() as per_example:
        for step in trip_steps(data, cfg, seed, dpsgd):
            opt.zero_grad(set_to_none=True)
            if per_example is None:
                step_loss = 0.0
                for samples in step:
                    batch = {k: v.to(model.device) for k, v in task.collate(samples).items()}
                    task_loss: Tensor = task.loss(model, batch)
                    loss = task_loss / cfg.grad_accum
                    if prox_mu > 0:
                        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                        loss = loss + (prox_mu / 2) * prox / cfg.grad_accum
                    loss.backward()
                    step_loss += float(task_loss.detach()) / cfg.grad_accum
                    tokens += task.tokens(batch)
                    flops += task.work_flops(fm, batch)
            else:
                assert dpsgd is not None and noise is not None
                step_loss, work = _private_grads(per_example, task, model, params, step, dpsgd, len(data), cfg,
                                                 noise, fm)
                tokens, flops = tokens + work[0], flops + work[1]
                for p, a in zip(params, anchor):  # FedProx: d/dp (mu / 2) ||p - a||^2, added after the noise
                    p.grad = p.grad + prox_mu * (p.detach() - a)  # type: ignore[operator]
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(step_loss)
    model.eval()
    state = get_adapter_state(model)
    unsent = frozenset(k for k in state if any(f in k for f in skip))
    seen = [x for x in losses if not math.isnan(x)] if dpsgd else losses  # DP-SGD: a step may draw no example
    q = sample_rate(cfg.batch_size * cfg.grad_accum, len(data))
    dp_steps = ((q, dpsgd.noise_multiplier, total),) if dpsgd else ()
    return ClientUpdate(client=client, state={k: v for k, v in state.items() if k not in unsent}, num_samples=len(data),
                        train_loss=sum(seen) / len(seen) if seen else math.nan, steps=total, tokens=tokens, flops=flops,
                        unsent=unsent, dp_steps=dp_steps)


def _private_grads(per_example: PerExample, task: Task, model: PeftModel, params: Sequence[Tensor],
                   step: list[list[Any]], dpsgd: DPSGD, n: int, cfg: TrainConfig, noise: torch.Generator,
                   fm: FlopModel) -> tuple[float, tuple[int, float]]:
    """One DP-SGD step's gradient into ``p.grad``: the sum over the step's batches of clipped
    per-example gradients, plus noise, over the expected batch size q n (Abadi et al. 2016, Alg. 1).
    Returns the mean loss of the examples drawn (nan if none) and the (tokens, FLOPs) computed."""
    summed = [torch.zeros_like(p) for p in params]
    loss_sum, drawn, tokens, flops = 0.0, 0, 0, 0.0
    for samples in step:
        batch = {k: v.to(model.device) for k, v in task.collate(samples).items()}
        grads, ex_losses = per_example(batch)
        for s, g in zip(summed, clip_per_example(grads, dpsgd.clipping_norm)):
            s += g.sum(dim=0)
        loss_sum, drawn = loss_sum + float(ex_losses.sum()), drawn + len(samples)
        tokens += task.tokens(batch)
        # per-example gradients cost what the ordinary backward does: Opacus forms each example's
        # weight gradient from the same activation x output-gradient products the batched backward
        # sums (B T d r multiply-adds per LoRA factor either way), and vmap(grad) runs the same ops
        # per example; clipping and summing add O(B x LoRA parameters), negligible
        flops += task.work_flops(fm, batch)
    expected = min(cfg.batch_size * cfg.grad_accum, n)  # q n, exactly
    for p, g in zip(params, noised_mean(summed, dpsgd, expected, noise)):
        p.grad = g
    return (loss_sum / drawn if drawn else math.nan), (tokens, flops)
