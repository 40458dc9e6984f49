"""Experiments: several variants of one config run side by side, compared in one table and figure.

A sweep file (YAML) names a base config, the variants as lists of ``key=value`` overrides, and
optionally the variant whose final evaluation loss is the target for "time to reach". Each
variant runs into ``OUT/<variant>`` (a finished one is kept, an interrupted one resumed), then
``OUT/curves.png`` and ``OUT/results.md`` are written.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.report import plot_runs, plot_split
from edgelam.store import atomic_write_text, read_jsonl


@dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    variants: dict[str, list[str]]
    target: str | None = None
    description: str = ""


def load_sweep(path: Path) -> Sweep:
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' not found")
    data = yaml.safe_load(path.read_text()) or {}
    allowed = {"name", "base", "variants", "target", "description"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in sweep file {path}; allowed: {sorted(allowed)}")
    if not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise ConfigError(f"{path}: 'variants' must map names to lists of key=value overrides")
    sweep = Sweep(name=str(data.get("name", path.stem)), base=str(data["base"]),
                  variants={str(k): [str(o) for o in (v or [])] for k, v in data["variants"].items()},
                  target=data.get("target"), description=str(data.get("description", "")))
    if sweep.target is not None and sweep.target not in sweep.variants:
        raise ConfigError(f"{path}: target '{sweep.target}' is not one of the variants {list(sweep.variants)}")
    for label, overrides in sweep.variants.items():  # validate every variant before running any
        load_config(sweep.base, overrides)
    return sweep


def first_at_loss(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first metrics row whose evaluation loss is at or below ``target``."""
    return next((r for r in rows if r.get("eval_loss") is not None and r["eval_loss"] <= target + 1e-12), None)


def time_to_loss(rows: list[dict[str, Any]], target: float) -> float | None:
    """The first simulated time at which the evaluation loss is at or below ``target``."""
    r = first_at_loss(rows, target)
    return float(r["sim_time_s"]) if r else None


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def bytes_to_loss(rows: list[dict[str, Any]], target: float) -> float | None:
    """Radio bytes (up + down) spent by the first evaluation at or below ``target``."""
    r = first_at_loss(rows, target)
    return float(r["bytes_up_total"] + r["bytes_down_total"]) if r else None


def headline(summaries: dict[str, Any], task: str) -> str:
    """The metric shown per data task: the first one besides the loss (ppl, accuracy, nmse_db)."""
    for s in summaries.values():
        v = (s.get("final_eval_tasks") or {}).get(task)
        if v:
            return next((k for k in v if k not in ("loss", "adapter")), "loss")
    return "loss"


def results_table(sweep: Sweep, out: Path) -> str:
    rows_by = {v: read_jsonl(out / v / "metrics.jsonl") for v in sweep.variants}
    summaries = {v: json.loads((out / v / "summary.json").read_text()) for v in sweep.variants}
    target = summaries[sweep.target]["final_eval_loss"] if sweep.target else None
    tasks = sorted({t for s in summaries.values() for t in (s.get("final_eval_tasks") or {})})
    metric = {t: headline(summaries, t) for t in tasks}
    head = ["variant", "strategy", "eval loss (0 -> final)", "ppl", *[f"{metric[t]} {t}" for t in tasks], "sim time s"]
    split = all("budget" in s for s in summaries.values())
    if split:
        head += ["accuracy (0 -> final)", "devices/round", "max device spent/round vs budget"]
    head += [f"sim s to loss <= {target:.4f}" if target is not None else "", f"MB to loss <= {target:.4f}" if target is not None else "",
             "MB up", "MB down", "MB backhaul", "energy J", "wall s"]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, s in summaries.items():
        t = s.get("final_eval_tasks") or {}
        reach = time_to_loss(rows_by[v], target) if target is not None else None
        cells = [v, s["strategy"], f"{s['first_eval_loss']:.4f} -> {s['final_eval_loss']:.4f}", f"{s['final_eval_ppl']:.2f}",
                 *[f"{t[k][metric[k]]:.{2 if metric[k] == 'ppl' else 4}f}" if k in t else "-" for k in tasks],
                 f"{s['sim_time_s']:.1f}"]
        if split:
            trained = [r for r in rows_by[v] if r["round"] > 0]
            spent = s["spent_per_round"]
            worst = max(range(len(spent)), key=lambda k: spent[k] / s["budget_per_device"][k])
            cells += [f"{s['first_eval_accuracy']:.3f} -> {s['final_eval_accuracy']:.3f}",
                      f"{sum(len(r['clients']) for r in trained) / max(len(trained), 1):.1f}",
                      f"{spent[worst]:.3f} / {s['budget_per_device'][worst]:.3f}"]
        if target is not None:
            cells.append(f"{reach:.1f}" if reach is not None else "not reached")
            mb = bytes_to_loss(rows_by[v], target)
            cells.append(f"{mb / 1e6:.2f}" if mb is not None else "not reached")
        backhaul = s.get("bytes_backhaul_up_total", 0) + s.get("bytes_backhaul_down_total", 0)
        cells += [f"{s['bytes_up_total'] / 1e6:.2f}", f"{s['bytes_down_total'] / 1e6:.2f}", f"{backhaul / 1e6:.2f}",
                  f"{s['energy_j_total']:.1f}", f"{s['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_sweep(path: Path, out: Path, run_one: Callable[[Any, Path, bool], dict[str, Any]]) -> Path:
    """Run every variant (skipping finished ones, resuming interrupted ones), then tabulate and plot."""
    sweep = load_sweep(path)
    t0 = time.perf_counter()
    for label, overrides in sweep.variants.items():
        run_dir = out / label
        if (run_dir / "summary.json").exists():
            continue
        resume = (run_dir / "metrics.jsonl").exists()
        cfg = load_config(run_dir / "config.yaml") if resume else load_config(sweep.base, overrides)
        run_one(cfg, run_dir, resume)
    plot_runs([out / v for v in sweep.variants], out / "curves.png")
    split = all("budget" in json.loads((out / v / "summary.json").read_text()) for v in sweep.variants)
    if split:
        plot_split([out / v for v in sweep.variants], out / "split.png")
    wall_s = sum(json.loads((out / v / "summary.json").read_text())["wall_s"] for v in sweep.variants)
    text = [f"# {sweep.name}", "", sweep.description.strip(), "",
            f"- command: `edgelam sweep {path} --out {out}`",
            f"- base config: `{sweep.base}` (seed {load_config(sweep.base).seed}); variants (overrides): "
            + "; ".join(f"`{k}`: {' '.join(v) or '(none)'}" for k, v in sweep.variants.items()),
            f"- machine: {_cpu()}, {os.cpu_count()} cores; date {time.strftime('%Y-%m-%d')}; "
            f"wall time {wall_s:.0f} s for all variants (this invocation: {time.perf_counter() - t0:.0f} s)",
            "", results_table(sweep, out), "", "![curves](curves.png)", ""] + (["![split](split.png)", ""] if split else [])
    atomic_write_text(out / "results.md", "\n".join(text))
    return out / "results.md"
