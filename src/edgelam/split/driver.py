"""Split federated LoRA rounds on the simulated wireless clock (fl.strategy sfl_v1 | sfl_v2).

Per round t:
1. this round's channel gains (large scale x Rayleigh |h|^2) and each device's planned batches;
   from their shapes, the exact bits up and down, FLOPs on the device and on the server
   (``split/context.py``);
2. the scheduler (``split.schedule``: lyapunov, all, random, greedy) picks the devices and their
   bandwidth shares;
3. the round runs on a simpy clock: per step the phases of ``split.step.plan`` (device compute,
   uplink, server compute, downlink ...) at each device's rates; in SFL-V2 the one server-side
   adapter is a lock held from a step's server forward to its server backward, so devices queue
   (``split/train.py``);
4. training is real, in the order the server served the steps: SFL-V1 gives every scheduled device
   its own server-side copy, SFL-V2 updates one shared copy in turn; the strategy combines them
   (``fl/strategies/sfl.py``, with the configured ``reduce``);
5. the virtual queues take what each device spent; the lifecycle evaluates, appends, checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelam.config import RunConfig
from edgelam.fl.strategies import build_strategy
from edgelam.models.load import base_seed
from edgelam.models.lora import serialize
from edgelam.models.split import Back, unload
from edgelam.rundir import RunFolder, RunState, zero_row
from edgelam.split import scheduling
from edgelam.split.context import DevicePlan, SplitContext, decide, device_load, plan_device, setup_split
from edgelam.split.scheduling import Decision, DeviceLoad
from edgelam.split.step import DOWN, UP, evaluate
from edgelam.split.train import Timeline, Trained, sides, simulate, train_round
from edgelam.tasks.classification import to_classifier_adapter
from edgelam.tasks.serving import write_card
from edgelam.store import Purpose, rng_for

Commit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Planned:
    """A round before it runs: gains, every device's plan and load, and the scheduler's decision."""

    gains: list[float]
    plans: dict[int, DevicePlan]
    loads: list[DeviceLoad]
    queues: list[float]
    decision: Decision
    adapter_bytes: int


def plan_round(ctx: SplitContext, st: RunState, r: int) -> Planned:
    cfg, n = ctx.cfg, len(ctx.clients)
    fading = rng_for(cfg.seed, Purpose.FADING, r).exponential(1.0, size=n) if cfg.net.fading == "rayleigh" else np.ones(n)
    gains = [d.large_scale_gain * float(f) for d, f in zip(ctx.topology.devices, fading)]
    adapter_bytes = len(serialize({k: v for k, v in st.state.items() if k.startswith("device.")}))
    plans = {k: plan_device(ctx, k, r, adapter_bytes) for k in range(n)}
    loads = [device_load(ctx, plans[k], gains[k]) for k in range(n)]
    queues = [float(q) for q in st.aux["queues"]]
    return Planned(gains, plans, loads, queues, decide(ctx, r, loads, queues), adapter_bytes)


def combine(ctx: SplitContext, strategy: Any, st: RunState, chosen: list[int], trained: Trained) -> None:
    """The strategy's combination of the scheduled devices' copies, weighted by their samples."""
    weights = [float(len(ctx.clients[k])) for k in chosen]
    servers = [trained.server_states[-1]] if strategy.shared_server else [trained.server_states[k] for k in chosen]
    dev, srv = strategy.combine([trained.device_states[k] for k in chosen], servers, weights)
    st.state = {f"device.{k}": v for k, v in dev.items()} | {f"server.{k}": v for k, v in srv.items()}


def account(ctx: SplitContext, st: RunState, p: Planned, timeline: Timeline) -> tuple[dict[str, Any], dict[int, float]]:
    """Bytes, energy and the virtual queues: (the step's byte/energy fields, energy per device)."""
    chosen, shares = p.decision.scheduled, p.decision.shares
    energy = {k: scheduling.energy_j(p.loads[k], ctx.radio, shares[k]) for k in chosen}
    spent = energy if ctx.cfg.split.schedule.budget == "energy" else {k: timeline.finish_s[k] for k in chosen}
    step_row = {"bytes_up": int(sum(p.plans[k].bytes(UP) for k in chosen)), "bytes_down": int(sum(p.plans[k].bytes(DOWN) for k in chosen)),
                "bytes_backhaul_up": 0, "bytes_backhaul_down": 0, "energy_j": sum(energy.values())}
    st.totals = {k: st.totals.get(k, 0) + v for k, v in step_row.items()}
    for k in chosen:
        st.aux["energy_sum"][k] += energy[k]
        st.aux["spent_sum"][k] += spent[k]
        st.aux["scheduled"][k] += 1
    st.aux["queues"] = torch.tensor(scheduling.update_queues(p.queues, spent, ctx.budget), dtype=torch.float64)
    return step_row, energy


def client_stats(p: Planned, k: int, timeline: Timeline, energy: dict[int, float], latency_s: float,
                 trained: Trained | None) -> dict[str, Any]:
    losses = trained.losses[k] if trained else []
    return {
        "client": k, "share": p.decision.shares[k], "gain_db": 10 * math.log10(p.gains[k]), "latency_s": latency_s,
        "finish_s": timeline.finish_s[k], "server_wait_s": timeline.server_wait_s[k], "energy_j": energy[k],
        "compute_s": p.loads[k].compute_s, "bytes_up": int(p.plans[k].bytes(UP)), "bytes_down": int(p.plans[k].bytes(DOWN)),
        "steps": len(p.plans[k].steps), "train_loss": sum(losses) / len(losses) if losses else None,
    }


def round_row(ctx: SplitContext, st: RunState, r: int, p: Planned, timeline: Timeline, trained: Trained | None,
              step_row: dict[str, Any], energy: dict[int, float]) -> dict[str, Any]:
    """The metrics line of a split round (before evaluation)."""
    d, chosen, sched = p.decision, p.decision.scheduled, ctx.cfg.split.schedule
    latency = {k: scheduling.latency_s(p.loads[k], ctx.radio, d.shares[k]) for k in chosen}
    losses = [x for k in chosen for x in trained.losses[k]] if trained else []
    round_time = max(timeline.finish_s.values(), default=0.0)
    row: dict[str, Any] = {
        "round": r, "sim_time_s": st.sim_time_s + round_time, "round_time_s": round_time,
        "train_loss": sum(losses) / len(losses) if losses else None,
        **step_row, **{f"{k}_total": v for k, v in st.totals.items()},
        "bytes_by_kind": {**{k: int(v) for k, v in sorted((trained.bytes if trained else {}).items())},
                          "adapters_up": p.adapter_bytes * len(chosen), "adapters_down": p.adapter_bytes * len(chosen)},
        "clients": chosen, "dropped": [],
        "client_stats": [client_stats(p, k, timeline, energy, latency[k], trained) for k in chosen],
        "schedule": {
            "policy": d.policy, "status": d.status, "scheduled": chosen, "shares": {str(k): v for k, v in d.shares.items()},
            "infeasible": d.infeasible, "objective": d.objective,
            "deadline_violations": [k for k in chosen if latency[k] > sched.t_max_s * (1 + 1e-9)],
            "queues_before": p.queues, "queues": [float(q) for q in st.aux["queues"]], "quantity": sched.budget,
        },
    }
    if trained is not None and not ctx.sm.decoder:
        row["train_accuracy"] = sum(trained.correct.values()) / max(sum(trained.seen.values()), 1)
    return row


def run_round(ctx: SplitContext, strategy: Any, st: RunState, r: int, wall: Callable[[], float]) -> dict[str, Any]:
    """Plan, schedule, simulate, train, combine, account: one split round; ``st`` advances to round r."""
    p = plan_round(ctx, st, r)
    chosen = p.decision.scheduled
    plans = {k: p.plans[k] for k in chosen}
    timeline = simulate(ctx, plans, {k: p.loads[k] for k in chosen}, p.decision.shares, strategy.shared_server)
    trained = train_round(ctx, r, st, plans, timeline.order, strategy.shared_server) if chosen else None
    if trained is not None:
        combine(ctx, strategy, st, chosen, trained)
    step_row, energy = account(ctx, st, p, timeline)
    row = round_row(ctx, st, r, p, timeline, trained, step_row, energy) | {"wall_s": wall()}
    st.sim_time_s, st.round = row["sim_time_s"], r
    return row


class SplitDriver:
    """The split schemes' side of a run (``lifecycle.Driver``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.ctx = setup_split(cfg)
        self.strategy = build_strategy(cfg)

    def initial_state(self) -> RunState:
        dev, srv = self.ctx.sm.initial_state()
        state = {f"device.{k}": v for k, v in dev.items()} | {f"server.{k}": v for k, v in srv.items()}
        n = len(self.ctx.clients)
        aux = {key: torch.zeros(n, dtype=torch.float64) for key in ("queues", "spent_sum", "energy_sum", "scheduled")}
        return RunState(0, 0.0, state, {"bytes_up": 0, "bytes_down": 0, "energy_j": 0.0}, aux, {})

    def baseline(self, st: RunState) -> dict[str, Any]:
        return zero_row() | {"schedule": {"queues": [0.0] * len(self.ctx.clients)}} | self.evaluate(st)

    def evaluate(self, st: RunState) -> dict[str, Any]:
        res = evaluate(self.ctx.sm, *sides(st.state), self.ctx.eval_batches, self.ctx.task)
        out: dict[str, Any] = {"eval_loss": res["loss"], "eval_ppl": math.exp(min(res["loss"], 50.0)), "eval_tasks": None}
        return out | {f"eval_{k}": v for k, v in res.items() if k != "loss"}  # accuracy, nmse_db, top1 ...

    def diagnostics(self, st: RunState) -> dict[str, float]:
        return {}

    def advance(self, st: RunState, commit: Commit, wall: Callable[[], float]) -> None:
        for r in range(st.round + 1, self.ctx.cfg.fl.rounds + 1):
            commit(run_round(self.ctx, self.strategy, st, r, wall))

    def outputs(self, st: RunState, folder: RunFolder) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.cfg
        path = folder.replace_dir("adapter", lambda tmp: self._save_adapter(st, tmp))
        rounds = max(st.round, 1)
        return {
            "data": ctx.description, "split_cut": list(ctx.sm.cut), "num_layers": ctx.sm.num_layers,
            "schedule_policy": cfg.split.schedule.policy, "final_eval_tasks": None,
            "budget": cfg.split.schedule.budget, "budget_per_device": ctx.budget,
            "spent_per_round": [float(x) / rounds for x in st.aux["spent_sum"]],
            "energy_per_round_j": [float(x) / rounds for x in st.aux["energy_sum"]],
            "times_scheduled": [int(x) for x in st.aux["scheduled"]],
            "adapter": str(path), "adapters": {"global": str(path)},
        }

    def _save_adapter(self, st: RunState, path: Path) -> None:
        """Both sides' LoRA tensors (and a classifier's head) as the task's adapter, with its card:
        what a federated run of the same task saves, so `edgelam serve` serves either."""
        sm, cfg = self.ctx.sm, self.ctx.cfg
        dev, srv = sides(st.state)
        sm.load_into_model(dev)
        sm.load_into_model(srv)
        sm.peft.save_pretrained(str(path))
        if not sm.decoder:
            assert isinstance(sm.back, Back)  # an encoder's back holds the classifier
            to_classifier_adapter(path, sm.back.head.state_dict())
        write_card(path, self.ctx.task, cfg.model.name, base_seed(cfg.model.name, cfg.seed))

    def close(self) -> None:
        unload(self.ctx.sm)
