"""Split federated LoRA rounds on the simulated wireless clock (fl.strategy sfl_v1 | sfl_v2).

Per round t:
1. this round's channel gains (large scale x Rayleigh |h|^2) and each device's planned batches;
   from their shapes, the exact bits up and down, FLOPs on the device and on the server;
2. the scheduler (``split.schedule``: lyapunov, all, random, greedy) picks the devices and their
   bandwidth shares;
3. the round runs on a simpy clock: per step the phases of ``split.step.plan`` (device compute,
   uplink, server compute, downlink ...) at each device's rates; in SFL-V2 the one server-side
   adapter is a lock held from a step's server forward to its server backward, so devices queue;
4. training is real, in the order the server served the steps: SFL-V1 gives every scheduled device
   its own server-side copy (averaged after the round), SFL-V2 updates one shared copy in turn;
   the device-side parts (front, back, classifier) are averaged by FedAvg (weights n_k);
5. the virtual queues take what each device spent; evaluation, metrics line, checkpoint.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simpy
import torch
import yaml
from safetensors.torch import save as st_save

from edgelam.config import ConfigError, RunConfig, config_to_dict
from edgelam.data.classification import build_classification, collate_labeled
from edgelam.data.format import collate
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.client import batches, lr_lambda, num_local_steps
from edgelam.fl.context import CHECKPOINT, RunState, load_checkpoint, save_checkpoint, zero_row
from edgelam.models.lora import serialize
from edgelam.models.split import Params, SplitModel, build_split, is_encoder, unload
from edgelam.net import channel
from edgelam.net.topology import Topology, place_devices
from edgelam.split import scheduling
from edgelam.split.scheduling import Decision, DeviceLoad, Radio
from edgelam.split.step import DEV, DOWN, SRV, UP, StepPlan, evaluate, leaves, plan, step
from edgelam.store import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl, rng_for, to_json_line, torch_seed_for


@dataclass
class SplitContext:
    cfg: RunConfig
    sm: SplitModel
    clients: list[list[Any]]  # each device's training examples (Labeled or Encoded)
    eval_batches: list[dict[str, torch.Tensor]]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    topology: Topology
    radio: Radio
    description: str
    classes: tuple[str, ...]
    budget: list[float]


def setup_split(cfg: RunConfig) -> SplitContext:
    if cfg.net.num_edge_servers != 1:
        raise ConfigError("split learning runs against one edge server; set net.num_edge_servers: 1")
    encoder = is_encoder(cfg.model.name)
    if encoder != (cfg.data.source in ("sst2", "agnews")):
        raise ConfigError(f"model '{cfg.model.name}' with data.source '{cfg.data.source}': an encoder (tiny-encoder, minilm) "
                          f"trains a classifier on sst2 / agnews; a decoder (tiny, smollm2, ...) a causal LM on text data")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clients: list[list[Any]]
    test: list[Any]
    if encoder:
        from edgelam.models.split import load_encoder

        _, tok = load_encoder(cfg.model.name, cfg.seed if cfg.model.name == "tiny-encoder" else 0)
        data = build_classification(cfg.data, tok, cfg.seed, cfg.eval.max_per_task)
        sm = build_split(cfg.model.name, cfg.model.lora, cfg.split.cut, len(data.classes), cfg.split.embedding_lora, cfg.seed)
        pad = int(tok.pad_token_id)
        clients, test, desc, classes = data.clients, data.test, data.description, data.classes
        coll: Callable[[list[Any]], dict[str, torch.Tensor]] = lambda b: collate_labeled(b, pad)
    else:
        from edgelam.data.build import build_federated_data, resolve_auto

        sm = build_split(cfg.model.name, cfg.model.lora, cfg.split.cut, 0, cfg.split.embedding_lora, cfg.seed, cfg.model.dtype)
        fed = build_federated_data(resolve_auto(cfg.data)[0], sm.tokenizer, cfg.seed)
        pad = int(sm.tokenizer.pad_token_id)
        clients = [c.train for c in fed.clients]
        test = [e for xs in fed.global_eval.values() for e in xs[: cfg.eval.max_per_task]]
        desc, classes = fed.description, ()
        coll = lambda b: collate(b, pad)  # noqa: E731
    bs = cfg.eval.batch_size
    eval_batches = [coll(test[i: i + bs]) for i in range(0, len(test), bs)]
    topo = place_devices(cfg.net, len(clients), rng_for(cfg.seed, 1))
    net = cfg.net
    radio = Radio(net.uplink_bandwidth_hz, net.downlink_bandwidth_hz, channel.dbm_to_w(net.server_tx_power_dbm),
                  channel.dbm_to_w(net.noise_psd_dbm_hz + net.noise_figure_db))
    sched = cfg.split.schedule
    budget = list(sched.budget_per_device) or [sched.budget_per_round] * len(clients)
    return SplitContext(cfg, sm, clients, eval_batches, coll, topo, radio, desc, classes, budget)


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
    gen = torch.Generator().manual_seed(torch_seed_for(cfg.seed, 3, r, k))
    stream = batches(ctx.clients[k], cfg.train.batch_size, gen)
    bs = [ctx.collate(next(stream)) for _ in range(num_local_steps(cfg.train, len(ctx.clients[k])))]
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
    return scheduling.baseline(s.policy, loads, s.num_devices, rng_for(ctx.cfg.seed, 6, r))


# --- the simulated round ---


@dataclass(frozen=True)
class Timeline:
    finish_s: dict[int, float]  # each scheduled device's end (relative to the round start)
    order: list[tuple[int, int]]  # (device, step) in the order the server served them
    server_wait_s: dict[int, float]  # time spent queueing for the shared server copy (SFL-V2)


def simulate(ctx: SplitContext, plans: dict[int, DevicePlan], loads: dict[int, DeviceLoad], shares: dict[int, float],
             shared_server: bool) -> Timeline:
    env = simpy.Environment()
    lock = simpy.Resource(env, capacity=1)
    radio, srv_speed = ctx.radio, ctx.cfg.split.server_flops_per_s
    finish: dict[int, float] = {}
    waits: dict[int, float] = {}
    order: list[tuple[int, int]] = []

    def device(k: int):  # type: ignore[no-untyped-def]
        ld, dev, beta = loads[k], ctx.topology.devices[k], shares[k]
        up = scheduling.rate_bps(beta, radio.uplink_hz, ld.tx_power_w, ld.gain, radio.noise_w_per_hz)
        down = scheduling.rate_bps(beta, radio.downlink_hz, radio.server_power_w, ld.gain, radio.noise_w_per_hz)
        wait = 0.0
        yield env.timeout(8 * plans[k].adapter_bytes / down)
        for s, sp in enumerate(plans[k].steps):
            srv_phases = [i for i, ph in enumerate(sp.phases) if ph.kind == SRV]
            req = None
            for i, ph in enumerate(sp.phases):
                if srv_phases and i == srv_phases[0]:
                    asked = env.now
                    req = lock.request() if shared_server else None
                    if req is not None:
                        yield req
                    wait += env.now - asked
                    order.append((k, s))
                dur = {DEV: ph.amount / dev.flops_per_s, SRV: ph.amount / srv_speed,
                       UP: 8 * ph.amount / up, DOWN: 8 * ph.amount / down}[ph.kind]
                yield env.timeout(dur)
                if req is not None and i == srv_phases[-1]:
                    lock.release(req)
                    req = None
            if not srv_phases:
                order.append((k, s))
        yield env.timeout(8 * plans[k].adapter_bytes / up)
        finish[k], waits[k] = env.now, wait

    for k in sorted(plans):
        env.process(device(k))
    env.run()
    return Timeline(finish, order, waits)


class Side:
    """One party's trainable tensors with its own AdamW, schedule and clipping."""

    def __init__(self, parts: dict[str, Params], cfg: RunConfig, total_steps: int) -> None:
        self.parts = parts
        self.params = [t for ps in parts.values() for t in ps.values()]
        self.max_norm = cfg.train.max_grad_norm
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay) if self.params else None
        self.sched = (torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, total_steps))
                      if self.opt else None)

    def zero(self) -> None:
        for t in self.params:
            t.grad = None

    def update(self) -> None:
        if self.opt is None or self.sched is None:
            return
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.sched.step()

    def state(self) -> Params:
        return {f"{seg}.{n}": t.detach().clone() for seg, ps in self.parts.items() for n, t in ps.items()}


@dataclass
class Trained:
    device_states: dict[int, Params]
    server_states: dict[int, Params]  # V1: one per device; V2: the shared one under key -1
    losses: dict[int, list[float]]
    correct: dict[int, int]
    seen: dict[int, int]
    bytes: dict[str, int]


def sides(state: Params) -> tuple[Params, Params]:
    """(device-side, server-side) tensors of a run state, their names without the prefix."""
    dev = {k[len("device."):]: v for k, v in state.items() if k.startswith("device.")}
    return dev, {k[len("server."):]: v for k, v in state.items() if k.startswith("server.")}


def train_round(ctx: SplitContext, r: int, st: RunState, plans: dict[int, DevicePlan], order: list[tuple[int, int]],
                shared_server: bool) -> Trained:
    """Real training of the scheduled devices' steps in the server's order."""
    cfg, sm = ctx.cfg, ctx.sm
    dev_state, srv_state = sides(st.state)
    devices = {k: Side({s: leaves(dev_state, s) for s in ("front", "back")}, cfg, len(p.steps)) for k, p in plans.items()}
    if shared_server:
        one = Side({"middle": leaves(srv_state, "middle")}, cfg, sum(len(p.steps) for p in plans.values()))
        servers = {k: one for k in plans}
    else:
        servers = {k: Side({"middle": leaves(srv_state, "middle")}, cfg, len(p.steps)) for k, p in plans.items()}
    out = Trained({}, {}, {k: [] for k in plans}, {k: 0 for k in plans}, {k: 0 for k in plans}, {})
    torch.manual_seed(torch_seed_for(cfg.seed, 5, r))  # dropout
    sm.peft.train()
    sm.back.train()
    try:
        for k, s in order:
            batch, want = plans[k].batches[s], plans[k].steps[s]
            dev, srv = devices[k], servers[k]
            dev.zero()
            srv.zero()
            res = step(sm, dev.parts, srv.parts["middle"], batch, cfg.split.act_codec, cfg.split.grad_codec)
            got_up = res.bytes.get("act_up", 0) + res.bytes.get("mask_up", 0) + res.bytes.get("grad_up", 0)
            got_down = res.bytes.get("feat_down", 0) + res.bytes.get("grad_down", 0)
            assert (got_up, got_down) == (want.total(UP), want.total(DOWN)), "planned and sent bytes differ"
            dev.update()
            srv.update()
            out.losses[k].append(res.loss)
            out.correct[k] += res.correct
            out.seen[k] += int(batch["labels"].shape[0])
            for name, n in res.bytes.items():
                out.bytes[name] = out.bytes.get(name, 0) + n
    finally:
        sm.peft.eval()
        sm.back.eval()
    out.device_states = {k: d.state() for k, d in devices.items()}
    out.server_states = {-1: servers[next(iter(plans))].state()} if shared_server else {k: s.state() for k, s in servers.items()}
    return out


# --- the run ---


def _eval(ctx: SplitContext, st: RunState) -> dict[str, Any]:
    res = evaluate(ctx.sm, *sides(st.state), ctx.eval_batches)
    out: dict[str, Any] = {"eval_loss": res["loss"], "eval_ppl": math.exp(min(res["loss"], 50.0)), "eval_tasks": None}
    if "accuracy" in res:
        out["eval_accuracy"] = res["accuracy"]
    return out


def _initial_state(ctx: SplitContext) -> RunState:
    dev, srv = ctx.sm.initial_state()
    state = {f"device.{k}": v for k, v in dev.items()} | {f"server.{k}": v for k, v in srv.items()}
    n = len(ctx.clients)
    aux = {"queues": torch.zeros(n, dtype=torch.float64), "spent_sum": torch.zeros(n, dtype=torch.float64),
           "energy_sum": torch.zeros(n, dtype=torch.float64), "scheduled": torch.zeros(n, dtype=torch.float64)}
    return RunState(0, 0.0, state, {"bytes_up": 0, "bytes_down": 0, "energy_j": 0.0}, aux, {})


def run_round(ctx: SplitContext, st: RunState, r: int, wall: Callable[[], float]) -> dict[str, Any]:
    cfg = ctx.cfg
    n = len(ctx.clients)
    fading = rng_for(cfg.seed, 2, r).exponential(1.0, size=n) if cfg.net.fading == "rayleigh" else np.ones(n)
    gains = [d.large_scale_gain * float(f) for d, f in zip(ctx.topology.devices, fading)]
    adapter_bytes = len(serialize({k: v for k, v in st.state.items() if k.startswith("device.")}))
    plans = {k: plan_device(ctx, k, r, adapter_bytes) for k in range(n)}
    loads = [device_load(ctx, plans[k], gains[k]) for k in range(n)]
    queues = [float(q) for q in st.aux["queues"]]
    decision = decide(ctx, r, loads, queues)
    chosen = decision.scheduled
    quantity = cfg.split.schedule.budget
    shared = cfg.fl.strategy == "sfl_v2"
    timeline = simulate(ctx, {k: plans[k] for k in chosen}, {k: loads[k] for k in chosen}, decision.shares, shared)
    trained = train_round(ctx, r, st, {k: plans[k] for k in chosen}, timeline.order, shared) if chosen else None
    energy = {k: scheduling.energy_j(loads[k], ctx.radio, decision.shares[k]) for k in chosen}
    latency = {k: scheduling.latency_s(loads[k], ctx.radio, decision.shares[k]) for k in chosen}
    spent = energy if quantity == "energy" else {k: timeline.finish_s[k] for k in chosen}
    new_queues = scheduling.update_queues(queues, spent, ctx.budget)
    # aggregation
    if trained is not None:
        weights = {k: float(len(ctx.clients[k])) for k in chosen}
        dev = weighted_average([trained.device_states[k] for k in chosen], [weights[k] for k in chosen])
        srv = (trained.server_states[-1] if shared else
               weighted_average([trained.server_states[k] for k in chosen], [weights[k] for k in chosen]))
        st.state = {f"device.{k}": v for k, v in dev.items()} | {f"server.{k}": v for k, v in srv.items()}
    round_time = max(timeline.finish_s.values(), default=0.0)
    step_bytes = trained.bytes if trained else {}
    up = sum(plans[k].bytes(UP) for k in chosen)
    down = sum(plans[k].bytes(DOWN) for k in chosen)
    step_row = {"bytes_up": int(up), "bytes_down": int(down), "bytes_backhaul_up": 0, "bytes_backhaul_down": 0,
                "energy_j": sum(energy.values())}
    st.totals = {k: st.totals.get(k, 0) + v for k, v in step_row.items()}
    for k in chosen:
        st.aux["energy_sum"][k] += energy[k]
        st.aux["spent_sum"][k] += spent[k]
        st.aux["scheduled"][k] += 1
    st.aux["queues"] = torch.tensor(new_queues, dtype=torch.float64)
    losses = [x for k in chosen for x in trained.losses[k]] if trained else []
    seen = sum(trained.seen.values()) if trained else 0
    t_max = cfg.split.schedule.t_max_s
    row: dict[str, Any] = {
        "round": r, "sim_time_s": st.sim_time_s + round_time, "round_time_s": round_time,
        "train_loss": sum(losses) / len(losses) if losses else None,
        **step_row, **{f"{k}_total": v for k, v in st.totals.items()},
        "bytes_by_kind": {**{k: int(v) for k, v in sorted(step_bytes.items())}, "adapters_up": adapter_bytes * len(chosen),
                          "adapters_down": adapter_bytes * len(chosen)},
        "clients": chosen, "dropped": [],
        "client_stats": [{
            "client": k, "share": decision.shares[k], "gain_db": 10 * math.log10(gains[k]), "latency_s": latency[k],
            "finish_s": timeline.finish_s[k], "server_wait_s": timeline.server_wait_s[k], "energy_j": energy[k],
            "compute_s": loads[k].compute_s, "bytes_up": int(plans[k].bytes(UP)), "bytes_down": int(plans[k].bytes(DOWN)),
            "steps": len(plans[k].steps), "train_loss": sum(trained.losses[k]) / len(trained.losses[k]) if trained else None,
        } for k in chosen],
        "schedule": {
            "policy": decision.policy, "status": decision.status, "scheduled": chosen,
            "shares": {str(k): v for k, v in decision.shares.items()}, "infeasible": decision.infeasible,
            "objective": decision.objective, "deadline_violations": [k for k in chosen if latency[k] > t_max * (1 + 1e-9)],
            "queues_before": queues, "queues": new_queues, "quantity": quantity,
        },
        "wall_s": wall(),
    }
    if trained is not None and not ctx.sm.decoder:
        row["train_accuracy"] = sum(trained.correct.values()) / max(seen, 1)
    st.sim_time_s, st.round = row["sim_time_s"], r
    return row


def _save_adapter(ctx: SplitContext, st: RunState, path: Path) -> None:
    """The LoRA tensors of both sides in PEFT format; the classifier beside them (classifier.safetensors)."""
    sm = ctx.sm
    dev, srv = sides(st.state)
    sm.load_into_model(dev)
    sm.load_into_model(srv)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    sm.peft.save_pretrained(str(tmp))
    if not sm.decoder:
        head = {f"linear.{k}": v.detach().clone().contiguous() for k, v in sm.back.head.linear.state_dict().items()}
        meta = {"classes": ",".join(ctx.classes), "pooling": "mean"}
        atomic_write_bytes(tmp / "classifier.safetensors", st_save(head, metadata=meta))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def run_split(cfg: RunConfig, out: Path, resume: bool = False, on_round: Callable[[dict[str, Any]], None] | None = None,
              on_start: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from edgelam.fl.orchestrator import trim_metrics
    from edgelam.report import plot_runs

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    ctx = setup_split(cfg)
    try:
        ckpt = out / CHECKPOINT
        st = load_checkpoint(ckpt) if resume and ckpt.exists() else _initial_state(ctx)
        rows = trim_metrics(out / "metrics.jsonl", st.round)
        wall_before = rows[-1]["wall_s"] if rows else 0.0

        def wall() -> float:
            return wall_before + time.perf_counter() - t0

        if not rows:
            base = zero_row() | {"schedule": {"queues": [0.0] * len(ctx.clients)}} | _eval(ctx, st)
            rows.append(base)
            atomic_write_text(out / "metrics.jsonl", to_json_line(base) + "\n")
            save_checkpoint(ckpt, st)
        if on_start:
            on_start(st.round, cfg.fl.rounds)
        for r in range(st.round + 1, cfg.fl.rounds + 1):
            row = run_round(ctx, st, r, wall)
            due = r % cfg.eval.every == 0 or r == cfg.fl.rounds
            row |= _eval(ctx, st) if due else {"eval_loss": None, "eval_ppl": None, "eval_tasks": None}
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(to_json_line(row) + "\n")
            save_checkpoint(ckpt, st)
            rows.append(row)
            if on_round:
                on_round(row)
        _save_adapter(ctx, st, out / "adapter")
        rows = read_jsonl(out / "metrics.jsonl")
        last = next(r for r in reversed(rows) if r.get("eval_loss") is not None)
        rounds = max(st.round, 1)
        summary = {
            "name": cfg.name, "strategy": cfg.fl.strategy, "model": cfg.model.name, "data": ctx.description,
            "split_cut": list(ctx.sm.cut), "num_layers": ctx.sm.num_layers, "schedule_policy": cfg.split.schedule.policy,
            "rounds": st.round, "sim_time_s": st.sim_time_s, "final_eval_loss": last["eval_loss"], "final_eval_ppl": last["eval_ppl"],
            "final_eval_accuracy": last.get("eval_accuracy"), "final_eval_tasks": None, "first_eval_loss": rows[0]["eval_loss"],
            "first_eval_accuracy": rows[0].get("eval_accuracy"),
            **{f"{k}_total": v for k, v in st.totals.items()},
            "budget": cfg.split.schedule.budget, "budget_per_device": ctx.budget,
            "spent_per_round": [float(x) / rounds for x in st.aux["spent_sum"]],
            "energy_per_round_j": [float(x) / rounds for x in st.aux["energy_sum"]],
            "times_scheduled": [int(x) for x in st.aux["scheduled"]],
            "adapter": str(out / "adapter"), "adapters": {"global": str(out / "adapter")},
            "plot": str(out / "plots" / "curves.png"), "wall_s": wall(),
        }
        atomic_write_json(out / "summary.json", summary)
        plot_runs([out], out / "plots" / "curves.png")
        return summary
    finally:
        unload(ctx.sm)
