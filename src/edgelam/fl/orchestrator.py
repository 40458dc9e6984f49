"""The one loop: every federated scheme runs here, on the simulated clock of the wireless network.

Per round: the strategy selects clients; each client is a simpy process that downloads the global
adapter (downlink time), trains for real (simulated duration = counted FLOPs / device FLOP/s) and
uploads its update (serialized bytes / uplink rate); the round ends when the last one arrives;
the strategy aggregates; the run evaluates, appends a metrics line and checkpoints atomically.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import simpy
import yaml
from safetensors.torch import save

from edgelam.config import RunConfig, config_to_dict
from edgelam.fl.client import ClientUpdate, local_train
from edgelam.fl.context import (
    CHECKPOINT,
    Context,
    Prober,
    RunState,
    baseline_row,
    evaluate,
    load_checkpoint,
    population,
    save_checkpoint,
    setup,
    task_adapters,
)
from edgelam.fl.evaluate import generate_answers
from edgelam.fl.strategies.base import GLOBAL, State
from edgelam.models.lora import get_adapter_state, save_adapter, serialize, set_adapter_state
from edgelam.net.topology import ClientCost, client_round_cost, draw_links
from edgelam.store import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl, rng_for, to_json_line, torch_seed_for


@dataclass(frozen=True)
class RoundResult:
    updates: list[ClientUpdate]
    costs: dict[int, ClientCost]
    end_time_s: float


def run_round(env: simpy.Environment, ctx: Context, st: RunState, selected: list[int], round_idx: int) -> RoundResult:
    """Dispatch, train and collect the selected clients on the simulated clock."""
    cfg = ctx.cfg
    links = draw_links(cfg.net, ctx.topology, selected, rng_for(cfg.seed, 2, round_idx))
    updates: dict[int, ClientUpdate] = {}
    costs: dict[int, ClientCost] = {}

    def client(k: int):  # type: ignore[no-untyped-def]
        # The cost needs the real update size, so training runs first (in zero simulated time)
        # and the process then waits out downlink, compute and uplink in order.
        probe = Prober(ctx, k)
        name, start, payload = ctx.strategy.dispatch(k, st.state, round_idx, probe)
        upd = local_train(ctx.model, start, ctx.data.clients[k].train, cfg.train, ctx.strategy.prox_mu,
                          torch_seed_for(cfg.seed, 3, round_idx, k), ctx.pad_id, ctx.flops, client=k)
        # the server sees only what crossed the uplink
        upd = dataclasses.replace(upd, adapter=name, state=ctx.strategy.upload(k, st.state, upd.state))
        bytes_down = probe.bytes_down or len(serialize(payload))
        cost = client_round_cost(cfg.net, ctx.topology.devices[k], links[k], bytes_down, len(serialize(upd.state)),
                                 upd.flops + probe.flops)
        yield env.timeout(cost.t_down_s)
        yield env.timeout(cost.t_comp_s)
        yield env.timeout(cost.t_up_s)
        updates[k], costs[k] = upd, cost

    procs = [env.process(client(k)) for k in selected]
    env.run(until=env.all_of(procs))
    return RoundResult([updates[k] for k in selected], costs, float(env.now))


def metrics_row(ctx: Context, st: RunState, round_idx: int, res: RoundResult, wall_s: float) -> dict[str, Any]:
    n = sum(u.num_samples for u in res.updates)
    up = sum(c.bytes_up for c in res.costs.values())
    down = sum(c.bytes_down for c in res.costs.values())
    energy = sum(c.e_tx_j + c.e_comp_j for c in res.costs.values())
    st.totals = {"bytes_up": st.totals["bytes_up"] + up, "bytes_down": st.totals["bytes_down"] + down,
                 "energy_j": st.totals["energy_j"] + energy}
    return {
        "round": round_idx, "sim_time_s": res.end_time_s, "round_time_s": res.end_time_s - st.sim_time_s,
        "train_loss": sum(u.train_loss * u.num_samples for u in res.updates) / n,
        "bytes_up": up, "bytes_down": down, "energy_j": energy,
        "bytes_up_total": st.totals["bytes_up"], "bytes_down_total": st.totals["bytes_down"],
        "energy_j_total": st.totals["energy_j"],
        "clients": [u.client for u in res.updates],
        "client_stats": [{
            "client": u.client, "adapter": u.adapter, "samples": u.num_samples, "train_loss": u.train_loss, "steps": u.steps,
            "tokens": u.tokens, "flops": u.flops, "t_down_s": c.t_down_s, "t_comp_s": c.t_comp_s, "t_up_s": c.t_up_s,
            "energy_tx_j": c.e_tx_j, "energy_comp_j": c.e_comp_j, "bytes_up": c.bytes_up,
        } for u in res.updates for c in [res.costs[u.client]]],
        "wall_s": wall_s,
    }


def _save_adapter_atomic(ctx: Context, state: State, path: Path) -> None:
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(ctx.model, state, tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _trim_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the metrics of completed (checkpointed) rounds only; rewrite the file atomically."""
    rows = [r for r in read_jsonl(path) if r["round"] <= last_round]
    atomic_write_text(path, "".join(to_json_line(r) + "\n" for r in rows))
    return rows


def finish(ctx: Context, st: RunState, out: Path, rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Final adapter (PEFT format), sample answers, summary.json and plots."""
    from edgelam.report import plot_runs

    adapters = ctx.strategy.adapters(st.state)
    delta = ctx.strategy.base_delta(st.state)
    ctx.base.apply(delta)
    if delta:  # FLoRA merges into the base: the exact result is this dense delta per module
        atomic_write_bytes(out / "base_delta.safetensors", save({k: v.contiguous() for k, v in delta.items()}))
    paths = {}
    for name, adapter in adapters.items():
        paths[name] = out / "adapter" if list(adapters) == [GLOBAL] else out / "adapters" / name
        _save_adapter_atomic(ctx, adapter, paths[name])
    if ctx.cfg.eval.generate:
        by_task = task_adapters(ctx, ctx.strategy.assignment(st.state, len(ctx.data.clients)))
        picks = [ex for xs in ctx.data.eval_examples.values() for ex in xs[:1]][: ctx.cfg.eval.generate]
        answers = []
        for ex in picks:
            set_adapter_state(ctx.model, adapters[by_task[ex.task]])
            answers += generate_answers(ctx.model, ctx.tokenizer, [ex], ctx.cfg.eval.max_new_tokens)
        atomic_write_text(out / "samples.jsonl", "".join(to_json_line(a) + "\n" for a in answers))
    last_eval = next(r for r in reversed(rows) if r.get("eval_loss") is not None)
    summary = {
        "name": ctx.cfg.name, "strategy": ctx.cfg.fl.strategy, "model": ctx.cfg.model.name, "data": ctx.data.description,
        "rounds": st.round, "sim_time_s": st.sim_time_s, "final_eval_loss": last_eval["eval_loss"],
        "final_eval_ppl": last_eval["eval_ppl"], "final_eval_tasks": last_eval["eval_tasks"],
        "first_eval_loss": next(r["eval_loss"] for r in rows if r.get("eval_loss") is not None),
        "bytes_up_total": st.totals["bytes_up"], "bytes_down_total": st.totals["bytes_down"],
        "energy_j_total": st.totals["energy_j"], "adapter": str(next(iter(paths.values()))),
        "adapters": {k: str(v) for k, v in paths.items()}, "plot": str(out / "plots" / "curves.png"),
        "wall_s": wall_s,
    }
    atomic_write_json(out / "summary.json", summary)
    plot_runs([out], out / "plots" / "curves.png")
    return summary


def run(cfg: RunConfig, out: Path, resume: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None, on_start: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` into the folder ``out``; returns the summary."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    ctx = setup(cfg)
    try:
        ckpt = out / CHECKPOINT
        if resume and ckpt.exists():
            st = load_checkpoint(ckpt)
        else:
            st = RunState(0, 0.0, ctx.strategy.init_state(get_adapter_state(ctx.model), population(ctx)))
        rows = _trim_metrics(out / "metrics.jsonl", st.round)
        wall_before = rows[-1]["wall_s"] if rows else 0.0
        if not rows:  # round 0: the untrained adapter, so every curve starts from the base model
            rows.append(baseline_row(ctx, st))
            atomic_write_text(out / "metrics.jsonl", to_json_line(rows[0]) + "\n")
            save_checkpoint(ckpt, st)
        if on_start:
            on_start(st.round, cfg.fl.rounds)
        # --- rounds ---
        for r in range(st.round + 1, cfg.fl.rounds + 1):
            env = simpy.Environment(initial_time=st.sim_time_s)
            selected = ctx.strategy.select(r, len(ctx.data.clients), rng_for(cfg.seed, 4, r))
            ctx.base.apply(ctx.strategy.base_delta(st.state))
            res = run_round(env, ctx, st, selected, r)
            new_state = ctx.strategy.aggregate(st.state, res.updates, r)
            row = metrics_row(ctx, st, r, res, wall_before + time.perf_counter() - t0)
            st.state, st.sim_time_s, st.round = new_state, res.end_time_s, r
            ev: dict[str, Any] = {"eval_loss": None, "eval_ppl": None, "eval_tasks": None}
            if r % cfg.eval.every == 0 or r == cfg.fl.rounds:
                ev = evaluate(ctx, st)
            row |= ev
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(to_json_line(row) + "\n")
            save_checkpoint(ckpt, st)
            rows.append(row)
            if on_round:
                on_round(row)
        return finish(ctx, st, out, rows, wall_before + time.perf_counter() - t0)
    finally:
        ctx.base.apply({})  # give the shared base model back as loaded, without LoRA layers
        ctx.model.unload()
