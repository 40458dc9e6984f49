"""What every run holds: the loaded model, data, network and strategy (Context), the checkpointed
run state, evaluation under each adapter, and the frozen base weights a strategy may merge into."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from edgelam.config import ConfigError, RunConfig
from edgelam.config_schemes import DATA_ATTACKS
from edgelam.data.build import FederatedData
from edgelam.fl.evaluate import attack_success, evaluate_tasks, task_sums
from edgelam.fl.strategies import build_strategy
from edgelam.fl.strategies.base import GLOBAL, Population, State, Strategy
from edgelam.models.flops import FlopModel, flop_model, forward_flops, lora_train_flops
from edgelam.models.lora import get_adapter_state, serialize, set_adapter_state
from edgelam.net.topology import Topology, client_round_cost, expected_link, place_devices
from edgelam.rundir import RunState, zero_row
from edgelam.store import Purpose, rng_for
from edgelam.tasks import Task, setup_task
from edgelam.tasks.base import add_sums


class Prober:
    """A client's loss on (up to 16 of) its training examples under a given adapter.

    Its forward FLOPs are charged to the client's compute (``flops``); the downloads of every
    candidate are priced by the trip's plan (``fl/executor.plan_trip``).
    """

    def __init__(self, ctx: "Context", client: int, max_examples: int = 16) -> None:
        self.ctx, self.data = ctx, ctx.data.clients[client].train[:max_examples]
        self.flops = 0.0

    def __call__(self, adapter: State) -> float:
        set_adapter_state(self.ctx.model, adapter)
        sums = task_sums(self.ctx.task, self.ctx.model, self.data, self.ctx.cfg.eval.batch_size)
        width = max(self.ctx.task.size(e) for e in self.data)
        self.flops += forward_flops(self.ctx.flops, width * len(self.data), width)
        return sums.get("loss_sum", 0.0) / max(sums.get("count", 0), 1)


@dataclass
class Context:
    cfg: RunConfig
    model: Any  # PeftModel
    tokenizer: Any
    data: FederatedData
    topology: Topology
    strategy: Strategy
    flops: FlopModel
    pad_id: int
    base: "BaseWeights"
    task: Task  # what a sample is, the loss and the metrics (tasks/)
    chain: list[Any] = field(default_factory=list)  # fl.uplink transforms (fl/transforms.py), set by the driver
    executor: Any = None  # runs clients' work (fl/executor.py); None: in this process
    privacy: Any = None  # privacy.mechanism.Privacy when privacy.dp is on, set by the driver
    link: Any = None  # fl/signing.Uplink: signed updates (fl.keys) and tampering in transit, set by the driver


def baseline_row(ctx: Context, st: RunState) -> dict[str, Any]:
    return zero_row() | evaluate(ctx, st)


def task_adapters(ctx: Context, assignment: list[str]) -> dict[str, str]:
    """Each task is evaluated on the adapter most of the clients holding it belong to."""
    votes: dict[str, dict[str, int]] = {}
    for c in ctx.data.clients:
        for t in c.tasks:
            votes.setdefault(t, {}).setdefault(assignment[c.id], 0)
            votes[t][assignment[c.id]] += 1
    fallback = assignment[0] if assignment else GLOBAL
    return {t: max(sorted(votes.get(t, {fallback: 1}).items()), key=lambda kv: kv[1])[0] for t in ctx.data.global_eval}


def evaluate(ctx: Context, st: RunState) -> dict[str, Any]:
    ev = ctx.cfg.eval
    ctx.base.apply(ctx.strategy.base_delta(st.state))
    adapters = ctx.strategy.adapters(st.state)
    assignment = ctx.strategy.assignment(st.state, len(ctx.data.clients))
    by_task = task_adapters(ctx, assignment)
    out: dict[str, Any] = {"eval_tasks": {}}
    total: dict[str, float] = {}
    held: dict[str, float] = {}  # clients' held-out sums
    for name, adapter in adapters.items():
        set_adapter_state(ctx.model, adapter)
        tasks = {t: d for t, d in ctx.data.global_eval.items() if by_task[t] == name}
        res = evaluate_tasks(ctx.task, ctx.model, tasks, ev.batch_size, ev.max_per_task)
        out["eval_tasks"] |= {t: {**v, "adapter": name} for t, v in res["eval_tasks"].items()}
        total = add_sums(total, res["sums"])
        if ev.client_heldout:
            for c in ctx.data.clients:
                if c.heldout and assignment[c.id] == name:
                    held = add_sums(held, task_sums(ctx.task, ctx.model, c.heldout, ev.batch_size))
    metrics = ctx.task.metrics(total)
    out["eval_loss"] = metrics.pop("loss")
    out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))  # every run reports one (lifecycle.finish, plots)
    out |= {f"eval_{k}": v for k, v in metrics.items() if k != "ppl"}  # e.g. eval_accuracy
    if ev.client_heldout:
        out["client_eval_loss"] = ctx.task.metrics(held)["loss"] if held.get("count") else None
    if len(adapters) > 1:
        out["assignment"] = assignment
    if ctx.data.backdoor:  # fl.attack backdoor: how often the trigger gets the target (under the first task's adapter)
        set_adapter_state(ctx.model, adapters[by_task[ctx.data.backdoor[0].task]])
        out["backdoor_asr"] = attack_success(ctx.task, ctx.model, ctx.data.backdoor[: ev.max_per_task], ev.batch_size)
    return out


def setup(cfg: RunConfig) -> Context:
    """Load the model (once per process), the data and the network for ``cfg``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ts = setup_task(cfg)  # the base model, its tokenizer and the clients' data, as the task defines them
    if cfg.fl.attack.kind in DATA_ATTACKS and ts.task.name not in ("causal_lm", "classification"):
        raise ConfigError(f"fl.attack.kind {cfg.fl.attack.kind} edits text examples; task {ts.task.name} has none. "
                          f"Use a model attack (sign_flip, scaling, gaussian) or a causal_lm / classification task")
    model = ts.task.wrap(ts.base, cfg.model.lora, cfg.seed)
    strategy = build_strategy(cfg)
    topology = place_devices(cfg.net, len(ts.data.clients), rng_for(cfg.seed, Purpose.PLACEMENT))
    return Context(cfg, model, ts.tokenizer, ts.data, topology, strategy, flop_model(model), int(ts.tokenizer.pad_token_id),
                   BaseWeights(model), ts.task)


class BaseWeights:
    """The frozen weights of the LoRA-adapted layers, kept so a strategy's dense delta can be
    merged in (W = W0 + delta) and taken out again; the base model is shared, so it must be."""

    def __init__(self, model: Any) -> None:
        self.layers = {name: mod.base_layer for name, mod in model.named_modules() if hasattr(mod, "base_layer")}
        self.original: State = {}  # a layer's weights are copied the first time a delta touches it
        self.applied: State = {}

    def apply(self, delta: State) -> None:
        same = delta.keys() == self.applied.keys() and all(delta[k] is self.applied[k] for k in delta)
        if same:  # every trip of a round brings the round's delta: merge it once
            return
        unknown = sorted(set(delta) - set(self.layers))[:3]
        if unknown:
            raise ValueError(f"base delta names modules the model does not adapt: {unknown}")
        with torch.no_grad():
            for name in delta:
                if name not in self.original:
                    self.original[name] = self.layers[name].weight.detach().clone()
            for name in set(self.applied) | set(delta):
                w = self.original[name]
                self.layers[name].weight.copy_(w + delta[name].to(w.dtype) if name in delta else w)
        self.applied = dict(delta)


def population(ctx: Context) -> Population:
    """Device facts the server may use (resource clustering, rank rules): speed, memory, expected latency."""
    cfg, devs = ctx.cfg, ctx.topology.devices
    adapter_bytes = len(serialize(get_adapter_state(ctx.model)))
    mean_tokens = [cfg.train.batch_size * max(ctx.task.size(e) for e in c.train) for c in ctx.data.clients]
    latency = []
    for d, tokens in zip(devs, mean_tokens):
        link = expected_link(cfg.net, d, len(devs))
        flops = lora_train_flops(ctx.flops, tokens, tokens // cfg.train.batch_size) * cfg.train.local_steps
        latency.append(client_round_cost(cfg.net, d, link, adapter_bytes, adapter_bytes, flops).total_s)
    lora = cfg.model.lora
    return Population(len(devs), [d.flops_per_s for d in devs], [d.memory_gb for d in devs], latency, lora.alpha / lora.r)
