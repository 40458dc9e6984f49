"""Where clients' work runs: a trip's work is plain data (``ClientWork``), an executor turns works into
results. ``LocalExecutor`` runs them one after another on this process's model; a pool of workers
(one base model each, e.g. Ray actors) can run the same works elsewhere with identical results,
because a work carries everything it depends on (start adapter, base delta, seed, settings).

The cost of a trip is planned from shapes before any training (``plan_trip``: bytes down and up,
FLOPs of the planned batches and probes) and checked against what training did, so the simulated
clock never needs to wait on training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from edgelam import progress
from edgelam.config import TrainConfig
from edgelam.fl.client import ClientUpdate, local_train, trip_steps
from edgelam.fl.context import Context, Prober
from edgelam.models.flops import FlopModel, forward_flops
from edgelam.models.lora import serialize
from edgelam.privacy.dpsgd import DPSGD
from edgelam.tasks.base import Task

State = dict[str, torch.Tensor]
PROBE_EXAMPLES = 16  # IFCA: a client's loss under each candidate on up to this many of its examples


@dataclass(frozen=True)
class ClientWork:
    """One client's trip as plain data: what it reads, with what settings, and nothing shared."""

    client: int
    version: int  # the round / server version it reads
    name: str  # the adapter it trains (when there is no choice)
    start: State  # the adapter it starts from
    payload: State  # what crosses the downlink (FLoRA: the stack)
    candidates: dict[str, State] | None  # IFCA: adapters it probes and chooses among, all downloaded
    base_delta: State  # dense delta in the base weights it trains on (FLoRA's merged rounds)
    seed: int
    train: TrainConfig
    prox_mu: float
    dpsgd: DPSGD | None = None  # sample-level DP-SGD on the client (privacy.dp.mode: sample)


@dataclass(frozen=True)
class ClientResult:
    update: ClientUpdate  # the trained adapter, before the uplink transforms
    start: State  # the adapter it started from (after choosing)
    probe_flops: float


@dataclass(frozen=True)
class TripPlan:
    bytes_down: int
    bytes_up: int
    flops: float  # training + probing


class Executor(Protocol):
    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]: ...


def planned_train_flops(data: list[Any], cfg: TrainConfig, seed: int, fm: FlopModel, task: Task,
                        dpsgd: DPSGD | None = None) -> float:
    """The FLOPs ``local_train`` will do, from the batches its seeded sampler will draw (the task's work;
    ``client.trip_steps``, Poisson batches with ``dpsgd``, whose per-example backward counts as a plain one)."""
    total = 0.0
    for step in trip_steps(data, cfg, seed, dpsgd):
        for samples in step:
            total += task.work_flops(fm, task.collate(samples))
    return total


def probe_flops(data: list[Any], fm: FlopModel, n_candidates: int, task: Task) -> float:
    width = max(task.size(e) for e in data)
    return n_candidates * forward_flops(fm, width * len(data), width)


def plan_trip(ctx: Context, work: ClientWork, upload_shape: State) -> TripPlan:
    """Bytes and FLOPs of ``work`` from shapes alone; ``upload_shape`` is what the chain and the
    strategy's upload make of the start adapter (same names, shapes and dtypes as the real update)."""
    data = ctx.data.clients[work.client].train
    flops = planned_train_flops(data, work.train, work.seed, ctx.flops, ctx.task, work.dpsgd)
    if work.candidates:
        down = sum(len(serialize(a)) for a in work.candidates.values())
        flops += probe_flops(data[:PROBE_EXAMPLES], ctx.flops, len(work.candidates), ctx.task)
    else:
        down = len(serialize(work.payload))
    return TripPlan(down, len(serialize(upload_shape)), flops)


class LocalExecutor:
    """Runs works in this process, on the run's one model, in order."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]:
        progress.trips_started(len(works))
        out = []
        for w in works:
            out.append(self.run_one(w))
            progress.trip_done(w.client)
        return out

    def choose(self, work: ClientWork) -> tuple[str, State, float]:
        """The adapter the trip trains (name, start) and the probing FLOPs: IFCA's client probes every
        candidate (on the base with the work's delta merged) and takes the lowest loss."""
        self.ctx.base.apply(work.base_delta)
        if not work.candidates:
            return work.name, work.start, 0.0
        probe = Prober(self.ctx, work.client, PROBE_EXAMPLES)
        losses = {n: probe(a) for n, a in work.candidates.items()}
        name = min(sorted(losses), key=lambda n: losses[n])  # ties go to the lower name
        return name, work.candidates[name], probe.flops

    def run_one(self, work: ClientWork) -> ClientResult:
        ctx = self.ctx
        name, start, probed = self.choose(work)
        upd = local_train(ctx.model, start, ctx.data.clients[work.client].train, work.train, work.prox_mu, work.seed,
                          ctx.pad_id, ctx.flops, client=work.client, task=ctx.task, dpsgd=work.dpsgd)
        return ClientResult(replace(upd, adapter=name), start, probed)

