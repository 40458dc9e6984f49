"""A split run's set-up (model cut, data, devices, radio) and each round's plan: the batches every device
will train, and from their shapes the exact bytes, FLOPs and the scheduler's per-device load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from edgelam.config import ConfigError, RunConfig
from edgelam.fl.client import batches, num_local_steps
from edgelam.models.load import BaseModel
from edgelam.models.split import SplitModel, build_parts_split, build_split
from edgelam.net import channel
from edgelam.net.topology import Topology, place_devices
from edgelam.split import scheduling
from edgelam.split.scheduling import Decision, DeviceLoad, Radio
from edgelam.split.step import DEV, DOWN, SRV, UP, StepPlan, plan
from edgelam.store import Purpose, rng_for, torch_seed_for
from edgelam.tasks import Task, setup_task


@dataclass
class SplitContext:
    cfg: RunConfig
    sm: SplitModel
    clients: list[list[Any]]  # each device's training examples (Labeled or Encoded)
    eval_batches: list[dict[str, torch.Tensor]]
    topology: Topology
    radio: Radio
    description: str
    budget: list[float]
    task: Task  # the loss and metrics of the head (tasks/)


def setup_split(cfg: RunConfig) -> SplitContext:
    """The task's data and collation (``tasks/``), the model cut at ``split.cut``, devices and radio."""
    if cfg.net.num_edge_servers != 1:
        raise ConfigError("split learning runs against one edge server; set net.num_edge_servers: 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ts = setup_task(cfg)  # the task's own set-up rejects a model of the wrong kind before loading it
    if hasattr(ts.task, "split_parts"):  # the task's own input module and head (channel, beam prediction)
        sm = build_parts_split(ts.task, ts.base, ts.tokenizer, cfg.model.lora, cfg.split.cut, cfg.seed)
    else:  # model.train full: the task loaded a fresh decoder for it (wrapped in place); lora: the cached one
        full = cfg.model.train == "full"
        sm = build_split(cfg.model.name, cfg.model.lora, cfg.split.cut, len(classes_of(ts.task)),
                         cfg.split.embedding_lora, cfg.seed, cfg.model.dtype, train=cfg.model.train,
                         full_blocks=cfg.model.full_blocks,
                         base=BaseModel(cast(PreTrainedModel, ts.base), ts.tokenizer, cfg.model.name) if full else None)
    clients: list[list[Any]] = [c.train for c in ts.data.clients]
    test = [e for xs in ts.data.global_eval.values() for e in xs[: cfg.eval.max_per_task]]
    bs = cfg.eval.batch_size
    eval_batches = [ts.task.collate(test[i: i + bs]) for i in range(0, len(test), bs)]
    topo = place_devices(cfg.net, len(clients), rng_for(cfg.seed, Purpose.PLACEMENT))
    net = cfg.net
    radio = Radio(net.uplink_bandwidth_hz, net.downlink_bandwidth_hz, channel.dbm_to_w(net.server_tx_power_dbm),
                  channel.dbm_to_w(net.noise_psd_dbm_hz + net.noise_figure_db))
    sched = cfg.split.schedule
    budget = list(sched.budget_per_device) or [sched.budget_per_round] * len(clients)
    return SplitContext(cfg, sm, clients, eval_batches, topo, radio, ts.data.description, budget, ts.task)


def classes_of(task: Task) -> tuple[str, ...]:
    """A classifier task's class names in label order (none for a causal LM)."""
    return tuple(getattr(task, "classes", ()))


# --- planning ---


@dataclass(frozen=True)
class DevicePlan:
    device: int
    batches: list[dict[str, torch.Tensor]]
    steps: list[StepPlan]
    adapter_bytes: int  # the device-side state, down at the start and up at the end

    def bytes(self, kind: str) -> float:
        return sum(s.total(kind) for s in self.steps) + self.adapter_bytes

    def flops(self, kind: str) -> float:
        return sum(s.total(kind) for s in self.steps)


def plan_device(ctx: SplitContext, k: int, r: int, adapter_bytes: int) -> DevicePlan:
    cfg = ctx.cfg
    gen = torch.Generator().manual_seed(torch_seed_for(cfg.seed, Purpose.TRAIN, r, k))
    stream = batches(ctx.clients[k], cfg.train.batch_size, gen)
    bs = [ctx.task.collate(next(stream)) for _ in range(num_local_steps(cfg.train, len(ctx.clients[k])))]
    steps = [plan(ctx.sm, b, cfg.split.act_codec, cfg.split.grad_codec) for b in bs]
    return DevicePlan(k, bs, steps, adapter_bytes)


def device_load(ctx: SplitContext, p: DevicePlan, gain: float) -> DeviceLoad:
    dev = ctx.topology.devices[p.device]
    dev_flops, srv_flops = p.flops(DEV), p.flops(SRV)
    return DeviceLoad(
        device=p.device, up_bits=8 * p.bytes(UP), down_bits=8 * p.bytes(DOWN),
        compute_s=dev_flops / dev.flops_per_s + srv_flops / ctx.cfg.split.server_flops_per_s,
        compute_energy_j=channel.compute_energy_j(dev_flops, dev.cpu_hz, dev.flops_per_cycle, dev.kappa),
        tx_power_w=dev.tx_power_w, gain=gain,
    )


def decide(ctx: SplitContext, r: int, loads: list[DeviceLoad], queues: list[float]) -> Decision:
    s = ctx.cfg.split.schedule
    if s.policy == "lyapunov":
        omega = 1.0 if s.omega == "constant" else r / ctx.cfg.fl.rounds
        return scheduling.lyapunov(loads, ctx.radio, queues, s.v, omega, s.t_max_s, s.budget)
    return scheduling.baseline(s.policy, loads, s.num_devices, rng_for(ctx.cfg.seed, Purpose.SPLIT_SCHEDULE, r))


