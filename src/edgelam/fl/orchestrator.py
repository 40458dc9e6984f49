"""The one loop: every federated scheme runs here, on the simulated clock of the wireless network.

Per round: the strategy selects clients; each client is a simpy process that downloads the global
adapter (downlink time), trains for real (simulated duration = counted FLOPs / device FLOP/s) and
uploads its update (serialized bytes / uplink rate); the round ends when the last one arrives;
the strategy aggregates; the run evaluates, appends a metrics line and checkpoints atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import simpy
import yaml
from safetensors.torch import save

from edgelam.config import SPLIT_STRATEGIES, RunConfig, config_to_dict
from edgelam.fl.context import (
    CHECKPOINT,
    Context,
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
from edgelam.fl.events import run_async
from edgelam.fl.hierarchy import run_hier_round
from edgelam.fl.strategies.hierfavg import HierFAVG
from edgelam.fl.rounds import metrics_row, run_round
from edgelam.fl.strategies.base import GLOBAL, AsyncStrategy, State
from edgelam.models.lora import get_adapter_state, save_adapter, set_adapter_state
from edgelam.store import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl, rng_for, to_json_line


def commit_round(ctx: Context, st: RunState, out: Path, rows: list[dict[str, Any]], row: dict[str, Any],
                 on_round: Callable[[dict[str, Any]], None] | None) -> None:
    """Evaluate when due, append the metrics line, then checkpoint: the order a resume relies on."""
    ev: dict[str, Any] = {"eval_loss": None, "eval_ppl": None, "eval_tasks": None}
    if st.round % ctx.cfg.eval.every == 0 or st.round == ctx.cfg.fl.rounds:
        ev = evaluate(ctx, st)
    row |= ev
    diagnostics = ctx.strategy.diagnostics(st.state)
    if diagnostics:
        row["diagnostics"] = diagnostics
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(to_json_line(row) + "\n")
    save_checkpoint(out / CHECKPOINT, st)
    rows.append(row)
    if on_round:
        on_round(row)


def _save_adapter_atomic(ctx: Context, state: State, path: Path) -> None:
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(ctx.model, state, tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def trim_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
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
        **{f"{k}_total": v for k, v in st.totals.items()}, "adapter": str(next(iter(paths.values()))),
        "adapters": {k: str(v) for k, v in paths.items()}, "plot": str(out / "plots" / "curves.png"),
        "wall_s": wall_s,
    }
    atomic_write_json(out / "summary.json", summary)
    plot_runs([out], out / "plots" / "curves.png")
    return summary


def run(cfg: RunConfig, out: Path, resume: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None, on_start: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` into the folder ``out``; returns the summary."""
    if cfg.fl.strategy in SPLIT_STRATEGIES:
        from edgelam.split.driver import run_split

        return run_split(cfg, out, resume, on_round, on_start)
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
        rows = trim_metrics(out / "metrics.jsonl", st.round)
        wall_before = rows[-1]["wall_s"] if rows else 0.0
        if not rows:  # round 0: the untrained adapter, so every curve starts from the base model
            rows.append(baseline_row(ctx, st))
            atomic_write_text(out / "metrics.jsonl", to_json_line(rows[0]) + "\n")
            save_checkpoint(ckpt, st)
        if on_start:
            on_start(st.round, cfg.fl.rounds)
        def wall() -> float:
            return wall_before + time.perf_counter() - t0

        if isinstance(ctx.strategy, AsyncStrategy):
            run_async(ctx, st, lambda row: commit_round(ctx, st, out, rows, row, on_round), wall)
        # --- synchronous rounds ---
        for r in range(st.round + 1, cfg.fl.rounds + 1):
            env = simpy.Environment(initial_time=st.sim_time_s)
            selected = ctx.strategy.select(r, len(ctx.data.clients), rng_for(cfg.seed, 4, r))
            ctx.base.apply(ctx.strategy.base_delta(st.state))
            if isinstance(ctx.strategy, HierFAVG):
                hres = run_hier_round(env, ctx, st, selected, r)
                new_state = ctx.strategy.aggregate(st.state, hres.edge_updates, r)
                row = metrics_row(st, r, hres.jobs, hres.end_time_s, wall(), backhaul=hres.backhaul)
                st.state, st.sim_time_s, st.round = new_state, hres.end_time_s, r
                commit_round(ctx, st, out, rows, row, on_round)
                continue
            res = run_round(env, ctx, st, selected, r)
            new_state = ctx.strategy.aggregate(st.state, [j.update for j in res.jobs], r) if res.jobs else st.state
            via_cloud = cfg.net.server_tier == "cloud"  # then every transfer also crosses the backhaul
            backhaul = (sum(j.cost.bytes_up for j in res.jobs), sum(j.cost.bytes_down for j in res.jobs + res.dropped))
            row = metrics_row(st, r, res.jobs, res.end_time_s, wall(), res.dropped, backhaul=backhaul if via_cloud else (0, 0))
            st.state, st.sim_time_s, st.round = new_state, res.end_time_s, r
            commit_round(ctx, st, out, rows, row, on_round)
        return finish(ctx, st, out, rows, wall())
    finally:
        ctx.base.apply({})  # give the shared base model back as loaded, without LoRA layers
        ctx.model.unload()
