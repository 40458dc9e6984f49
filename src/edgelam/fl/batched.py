"""Batched multi-adapter training: the clients of one round (up to ``runtime.batch_clients`` of them)
train in one forward / backward of the shared base model, each sample routed to its own client's
LoRA, each client with its own optimizer, schedule, clipping and FedProx anchor.

Each client gets an adapter slot on the run's PeftModel (``edgelam_slot<i>``, added for the call
and deleted after it). A forward pre-hook hands every LoRA layer the per-sample adapter names, so PEFT's mixed-adapter path (``lora.Linear._mixed_batch_forward``)
computes ``W0 x`` once for the whole batch and ``B_k A_k x`` on client k's rows only. PEFT takes
``adapter_names`` at inference only (``PeftModel.forward`` refuses it in training); the layer-level
path is plain autograd, so gradients flow to each slot from its own rows. The loss is the sum over
clients of each one's mean loss (``task.head_loss`` on its rows), so client k's gradient is exactly
the one its own backward would give (Punica, Chen et al. 2023, and S-LoRA, Sheng et al. 2023, batch
many adapters over one base model the same way for serving).

What a trip costs (tokens, FLOPs) is counted from each client's own batches, as its device would
compute them, so the simulated clock does not depend on how the simulator batched the work.
Clients whose micro-batches have similar lengths share a forward (``buckets``: padding everyone in a
forward to its longest costs at most 10 % more positions than each client alone), so batching never
computes much more than sequential training. Updates equal sequential training to float tolerance
(matmuls of other shapes round differently); with ``model.lora.dropout`` > 0 the dropout masks are
drawn differently (one generator for the batch), so results then differ by the draw, not in law.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor, nn

from edgelam import progress
from edgelam.fl.client import ClientUpdate, lr_lambda, num_local_steps, trip_steps
from edgelam.fl.context import Context
from edgelam.fl.executor import ClientResult, ClientWork, Executor, LocalExecutor

SLOT = "edgelam_slot"


def unbatchable(ctx: Context) -> str:
    """Why this run's clients cannot share a forward (empty: they can)."""
    if hasattr(ctx.task, "untrained"):
        return f"task {ctx.task.name} trains a different part of the adapter per client"
    return ""


def group_key(work: ClientWork) -> tuple[Any, ...] | None:
    """Works with equal keys train together; None: this work trains alone (DP-SGD's per-example gradients)."""
    if work.dpsgd is not None:
        return None
    return (work.train, work.prox_mu, id(work.base_delta) if work.base_delta else 0)


def buckets(shapes: Sequence[tuple[int, int]], slack: float = 0.1) -> list[list[int]]:
    """Clients (each ``(rows, padded length)`` of its own micro-batch) in buckets that share a forward:
    in order of length, a client joins the current bucket while padding everyone to the bucket's
    longest costs at most ``slack`` more positions than each client padded to its own length."""
    order = sorted(range(len(shapes)), key=lambda k: (shapes[k][1], k))
    out: list[list[int]] = []
    own = rows_in = 0
    for k in order:
        n, length = shapes[k]
        if out and length * (rows_in + n) <= (1 + slack) * (own + n * length):
            out[-1].append(k)
            own, rows_in = own + n * length, rows_in + n
        else:
            out.append([k])
            own, rows_in = n * length, n
    return out


def groups(works: Sequence[ClientWork], size: int, steps: Sequence[int]) -> list[list[int]]:
    """Indices of ``works`` in consecutive groups of at most ``size`` with the same settings and step count."""
    out: list[list[int]] = []
    for i, w in enumerate(works):
        key = group_key(w)
        last = out[-1] if out else None
        if (key is not None and last is not None and len(last) < size and group_key(works[last[0]]) == key
                and steps[last[0]] == steps[i]):
            last.append(i)
        else:
            out.append([i])
    return out


@dataclass
class Router:
    """Which adapter slot each sample of the batch goes through: ``spans`` (slot, first row, end row),
    contiguous and in order. LoRA layers get the per-sample names (PEFT's mixed-batch path); a
    ``modules_to_save`` copy (a task's head, input module or norms, trained in full) runs on each
    slot's rows and the outputs are joined again, which holds for any module that treats samples
    independently (heads, embeddings, norms: what the tasks train)."""

    spans: list[tuple[str, int, int]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [s for s, a, b in self.spans for _ in range(b - a)]

    def lora(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        kwargs["adapter_names"] = self.names()
        return args, kwargs

    def saved(self, wrapper: ModulesToSaveWrapper, *args: Any, **kwargs: Any) -> Any:
        n = self.spans[-1][2]
        outs = [wrapper.modules_to_save[s](*(part(v, n, a, b) for v in args), **{k: part(v, n, a, b) for k, v in kwargs.items()})
                for s, a, b in self.spans]
        return torch.cat(outs)


@contextlib.contextmanager
def routed(model: nn.Module, router: Router) -> Iterator[None]:
    hooks = [m.register_forward_pre_hook(router.lora, with_kwargs=True) for m in model.modules()
             if isinstance(m, BaseTunerLayer) and not isinstance(m, ModulesToSaveWrapper)]
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    for w in wrappers:  # an instance attribute shadows the class's forward for this call only
        w.forward = partial(router.saved, w)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for w in wrappers:
            del w.forward


def part(v: Any, n: int, a: int, b: int) -> Any:
    """Rows a..b of ``v`` when it is a tensor of ``n`` samples (the batch dimension first), else ``v``."""
    return v[a:b] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v


def rows(batch: dict[str, Tensor], a: int, b: int) -> dict[str, Tensor]:
    n = next(iter(batch.values())).shape[0]
    return {k: part(v, n, a, b) for k, v in batch.items()}


class BatchedExecutor:
    """Runs works in this process, up to ``size`` clients per forward / backward."""

    def __init__(self, ctx: Context, size: int) -> None:
        reason = unbatchable(ctx)
        if reason:
            raise ValueError(f"runtime.batch_clients {size}: {reason}; set runtime.batch_clients to 1")
        self.ctx, self.size, self.local = ctx, size, LocalExecutor(ctx)

    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]:
        steps = [num_local_steps(w.train, len(self.ctx.data.clients[w.client].train)) for w in works]
        out: list[ClientResult] = []
        progress.trips_started(len(works))
        for idx in groups(works, self.size, steps):
            if len(idx) == 1:
                out.append(self.local.run_one(works[idx[0]]))
            else:
                chosen = [self.local.choose(works[i]) for i in idx]  # IFCA: each client probes its candidates first
                done = self._train([(works[i], start) for i, (_, start, _) in zip(idx, chosen)])
                out += [ClientResult(replace(u, adapter=name), start, probed) for u, (name, start, probed) in zip(done, chosen)]
            for i in idx:
                progress.trip_done(works[i].client)
        return out

    def _train(self, group: list[tuple[ClientWork, dict[str, Tensor]]]) -> list[ClientUpdate]:
        ctx, model = self.ctx, self.ctx.model
        ctx.base.apply(group[0][0].base_delta)
        slots = [f"{SLOT}{i}" for i in range(len(group))]
        config = model.peft_config[model.active_adapter]
        with torch.random.fork_rng():  # a new slot's random init must not move the run's generator
            for s in slots:
                model.add_adapter(s, config)
        try:
            return self._steps(group, slots)
        finally:
            for s in slots:
                model.delete_adapter(s)
            model.set_adapter(model.active_adapter)  # PEFT leaves only the active adapter trainable

    def _steps(self, group: list[tuple[ClientWork, dict[str, Tensor]]], slots: list[str]) -> list[ClientUpdate]:
        ctx, model, task = self.ctx, self.ctx.model, self.ctx.task
        works = [w for w, _ in group]
        cfg, mu = works[0].train, works[0].prox_mu
        data = [ctx.data.clients[w.client].train for w in works]
        params = []
        for (w, start), s in zip(group, slots):
            set_peft_model_state_dict(model, start, adapter_name=s)
            mine = [p for n, p in model.named_parameters() if f".{s}." in n or n.endswith(f".{s}")]
            for p in mine:
                p.requires_grad_(True)
            params.append(mine)
        anchors = [[p.detach().clone() for p in ps] for ps in params] if mu > 0 else []
        total = num_local_steps(cfg, len(data[0]))
        opts = [torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay) for ps in params]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg.schedule, cfg.warmup_steps, total)) for o in opts]
        torch.manual_seed(works[0].seed)  # LoRA dropout: one draw for the batch
        streams = [trip_steps(d, cfg, w.seed) for d, w in zip(data, works)]
        losses: list[list[float]] = [[] for _ in works]
        tokens, flops = [0] * len(works), [0.0] * len(works)
        router = Router()
        model.train()
        # --- local steps, all clients at once ---
        with routed(model, router):
            for _ in range(total):
                step = [next(s) for s in streams]  # each client's micro-batches of this step
                for o in opts:
                    o.zero_grad(set_to_none=True)
                step_loss = [0.0] * len(works)
                for a in range(cfg.grad_accum):
                    parts = [st[a] for st in step]
                    for k, part in enumerate(parts):  # the cost as the client's device computes it
                        own = task.collate(part)
                        tokens[k] += task.tokens(own)
                        flops[k] += task.work_flops(ctx.flops, own)
                    # clients of similar lengths share a forward; each client's loss is its own term, so
                    # one backward per bucket adds up to the same gradients
                    for bucket in buckets([(len(p), max(task.size(x) for x in p)) for p in parts]):
                        sub = [parts[k] for k in bucket]
                        batch = {k: v.to(model.device) for k, v in task.collate([x for p in sub for x in p]).items()}
                        ends = list(itertools.accumulate(len(p) for p in sub))
                        router.spans = [(slots[k], e - len(p), e) for k, p, e in zip(bucket, sub, ends)]
                        output = task.output(model, batch)
                        loss: Tensor = torch.zeros((), device=model.device)
                        for k, (_, lo, hi) in zip(bucket, router.spans):
                            client_loss = task.head_loss(output[lo:hi], rows(batch, lo, hi))
                            loss = loss + client_loss / cfg.grad_accum
                            if mu > 0:
                                prox = sum(((p - q) ** 2).sum() for p, q in zip(params[k], anchors[k]))
                                loss = loss + (mu / 2) * prox / cfg.grad_accum
                            step_loss[k] += float(client_loss.detach()) / cfg.grad_accum
                        loss.backward()
                for k, o in enumerate(opts):
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params[k], cfg.max_grad_norm)
                    o.step()
                    scheds[k].step()
                    losses[k].append(step_loss[k])
        model.eval()
        return [ClientUpdate(client=w.client, state={n: v.detach().clone() for n, v in
                                                     get_peft_model_state_dict(model, adapter_name=s).items()},
                             num_samples=len(d), train_loss=sum(ls) / len(ls), steps=total, tokens=t, flops=f)
                for w, s, d, ls, t, f in zip(works, slots, data, losses, tokens, flops)]


def local_executor(ctx: Context) -> Executor:
    """This process's executor: clients one after another, or ``runtime.batch_clients`` of them per forward."""
    if ctx.cfg.runtime.batch_clients > 1:
        return BatchedExecutor(ctx, ctx.cfg.runtime.batch_clients)
    return LocalExecutor(ctx)
