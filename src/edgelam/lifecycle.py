"""One run, whatever the scheme: open the folder, set up the driver, round 0, the rounds, the outputs.

A driver (``fl.driver.FLDriver`` for sync / async / hierarchical schemes, ``split.driver.SplitDriver``
for split learning) owns what happens inside a round; this module owns everything around it, so
a resumed, a diverged or a finished run behaves the same for every scheme. The strategy registry
says which driver a strategy runs on (``driver`` on each strategy class).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgelam.config import RunConfig
from edgelam.config_load import config_to_dict
from edgelam.fl.driver import FLDriver
from edgelam.fl.strategies import STRATEGIES
from edgelam.report import plot_runs
from edgelam.rundir import RunFolder, RunState
from edgelam.split.driver import SplitDriver
from edgelam.tracking import Tracker

Commit = Callable[[dict[str, Any]], None]


class Driver(Protocol):
    """What the lifecycle needs from a driver; ``advance`` runs the rounds and calls ``commit`` after
    each (with ``st`` already advanced), ``outputs`` writes adapters and returns summary fields."""

    def initial_state(self) -> RunState: ...

    def baseline(self, st: RunState) -> dict[str, Any]: ...

    def evaluate(self, st: RunState) -> dict[str, Any]: ...

    def diagnostics(self, st: RunState) -> dict[str, float]: ...

    def advance(self, st: RunState, commit: Commit, wall: Callable[[], float]) -> None: ...

    def outputs(self, st: RunState, folder: RunFolder) -> dict[str, Any]: ...

    def close(self) -> None: ...


DRIVERS: dict[str, Callable[[RunConfig], Driver]] = {
    "sync": FLDriver, "async": FLDriver, "hier": FLDriver, "split": SplitDriver,
}


def driver_for(cfg: RunConfig, executor: Callable[[Any], Any] | None = None) -> Driver:
    """The driver of ``cfg``'s strategy; ``executor`` (Context -> Executor) replaces the one
    ``runtime.*`` names (a Flower ServerApp sends client work to its SuperNodes this way)."""
    kind = STRATEGIES[cfg.fl.strategy].driver
    if executor is None:
        return DRIVERS[kind](cfg)
    if kind == "split":
        raise ValueError(f"{cfg.fl.strategy} is a split-learning scheme; its devices cannot run on another executor")
    return FLDriver(cfg, executor)


def run(cfg: RunConfig, out: Path, resume: bool = False, on_round: Commit | None = None,
        on_start: Callable[[int, int], None] | None = None, executor: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) ``cfg`` into the folder ``out``; returns the summary. ``executor``: see ``driver_for``."""
    t0 = time.perf_counter()
    config = config_to_dict(cfg)
    folder = RunFolder.open(out, config) if resume else RunFolder.create(out, config)
    folder.keep_rounds = cfg.privacy.unlearn.checkpoints == "every"  # state/rounds/<r> (unlearning by rollback)
    folder.store_updates = cfg.privacy.unlearn.store_updates  # state/updates/<r> (FedEraser)
    folder.disk_full_at = cfg.faults.disk_full_at  # a fault drill: that round's checkpoint meets a full disk
    try:
        folder.lock()
        tracker = Tracker.open(cfg, folder.path)  # report.*: a bad report.mlflow_uri stops here, before the model loads
        driver = driver_for(cfg, executor)
    except BaseException:
        if resume:
            folder.close()
        else:
            folder.discard()  # a run that never started (bad data, no model) leaves no half-made folder behind
        raise
    try:
        st = folder.resume(driver.initial_state)
        wall_before = folder.rows[-1]["wall_s"] if folder.rows else 0.0

        def wall() -> float:
            return wall_before + time.perf_counter() - t0

        if not folder.rows:  # round 0: the untrained adapter, so every curve starts from the base model
            folder.commit(st, driver.baseline(st))
        tracker.start(folder.rows)  # round 0, and on resume the rows it lacks
        if on_start:
            on_start(st.round, cfg.fl.rounds)

        def commit(row: dict[str, Any]) -> None:
            updates = row.pop("_updates", None)  # tensors (synchronous rounds): kept apart, never in the JSON row
            due = st.round % cfg.eval.every == 0 or st.round == cfg.fl.rounds
            row |= driver.evaluate(st) if due else {"eval_loss": None, "eval_ppl": None, "eval_tasks": None}
            diagnostics = driver.diagnostics(st)
            if diagnostics:
                row["diagnostics"] = diagnostics
            folder.commit(st, row, updates)
            tracker.log(row)
            if on_round:
                on_round(row)

        driver.advance(st, commit, wall)
        summary = finish(cfg, st, folder, driver.outputs(st, folder), wall())
        tracker.finish(summary)
        return summary
    finally:
        tracker.close()
        driver.close()
        folder.close()


def fork(cfg: RunConfig, src: Path, round_idx: int, out: Path, on_round: Commit | None = None,
         on_start: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Continue the run ``src`` from its round-``round_idx`` checkpoint (``privacy.unlearn.checkpoints:
    every``) into the new folder ``out`` under ``cfg``, which may exclude clients that had not taken
    part by then (``rundir.RunFolder.fork``); returns the summary."""
    RunFolder.fork(src, round_idx, out, config_to_dict(cfg))
    return run(cfg, out, resume=True, on_round=on_round, on_start=on_start)


def task_metrics(first: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """``first_eval_X`` / ``final_eval_X`` for each metric the task reports besides the loss
    (a classifier's accuracy, a channel predictor's nmse_db)."""
    keys = sorted(k for k in final if k.startswith("eval_") and k not in ("eval_loss", "eval_ppl", "eval_tasks"))
    return {f"{when}_{k}": row[k] for k in keys for when, row in (("first", first), ("final", final))
            if row.get(k) is not None}


def finish(cfg: RunConfig, st: RunState, folder: RunFolder, outputs: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """summary.json (the driver's fields over the common ones) and plots/curves.png."""
    rows = folder.rows
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    summary = {
        "name": cfg.name, "strategy": cfg.fl.strategy, "model": cfg.model.name, "rounds": st.round,
        "sim_time_s": st.sim_time_s, "final_eval_loss": evaluated[-1]["eval_loss"], "final_eval_ppl": evaluated[-1]["eval_ppl"],
        "final_eval_tasks": evaluated[-1].get("eval_tasks"), "first_eval_loss": evaluated[0]["eval_loss"],
        **{f"{k}_total": v for k, v in st.totals.items()}, "plot": str(folder.path / "plots" / "curves.png"), "wall_s": wall_s,
    } | task_metrics(evaluated[0], evaluated[-1]) | outputs
    if folder.skipped:  # checkpoints a full disk stopped (the run went on from memory)
        summary["checkpoints_skipped"] = folder.skipped
    if "backdoor_asr" in evaluated[-1]:  # fl.attack backdoor: the trigger's success rate, round 0 -> final
        summary |= {"first_backdoor_asr": evaluated[0]["backdoor_asr"], "final_backdoor_asr": evaluated[-1]["backdoor_asr"]}
    folder.write_summary(summary)
    plot_runs([folder.path], folder.path / "plots" / "curves.png")
    return summary
