"""Plots and summary tables from run folders (metrics.jsonl + summary.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402
from rich.table import Table  # noqa: E402

from edgelam.store import read_jsonl  # noqa: E402


def load_run(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows; is this an EdgeLAM run folder?")
    summary_path = run_dir / "summary.json"
    label = run_dir.name
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        label = f"{run_dir.name} ({s.get('strategy', '?')})"
    return label, rows


def _save(fig: Any, out_file: Path) -> Path:
    """Write the figure atomically (temporary file + rename) and close it."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.stem}.tmp{out_file.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_file)
    return out_file


def plot_runs(run_dirs: Sequence[Path], out_file: Path) -> Path:
    """Eval loss and perplexity (accuracy for classifiers) against round and simulated time; one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    accuracy = False
    for run_dir in run_dirs:
        label, rows = load_run(Path(run_dir))
        ev = [r for r in rows if r.get("eval_loss") is not None]
        rounds = [r["round"] for r in ev]
        times = [r["sim_time_s"] for r in ev]
        axes[0, 0].plot(rounds, [r["eval_loss"] for r in ev], marker="o", label=label)
        accuracy = accuracy or any(r.get("eval_accuracy") is not None for r in ev)
        second = [r.get("eval_accuracy") if r.get("eval_accuracy") is not None else r["eval_ppl"] for r in ev]
        axes[0, 1].plot(rounds if not accuracy else times, second, marker="o", label=label)
        axes[1, 0].plot(times, [r["eval_loss"] for r in ev], marker="o", label=label)
        trained = [r for r in rows if r.get("train_loss") is not None]
        axes[1, 1].plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker=".", label=label)
    titles = [("round", "eval loss"), ("simulated time (s)", "eval accuracy") if accuracy else ("round", "eval perplexity"),
              ("simulated time (s)", "eval loss"), ("round", "train loss")]
    for ax, (x, y) in zip(axes.flat, titles):
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_file)


def plot_split(run_dirs: Sequence[Path], out_file: Path) -> Path:
    """Split runs: accuracy against round, each device's average energy per round against its
    budget, devices scheduled per round, and (for the Lyapunov runs) average energy and final
    accuracy against V."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    runs = [(Path(d), *load_run(Path(d))) for d in run_dirs]
    width = 0.8 / max(len(runs), 1)
    by_v: list[tuple[float, float, float]] = []
    budget: list[float] = []
    for i, (d, label, rows) in enumerate(runs):
        s = json.loads((d / "summary.json").read_text())
        ev = [r for r in rows if r.get("eval_accuracy") is not None]
        axes[0, 0].plot([r["round"] for r in ev], [r["eval_accuracy"] for r in ev], marker="o", label=label)
        energy = s["spent_per_round"]
        budget = s["budget_per_device"]
        axes[0, 1].bar([k + i * width for k in range(len(energy))], energy, width, label=label)
        trained = [r for r in rows if r["round"] > 0]
        axes[1, 0].plot([r["round"] for r in trained], [len(r["clients"]) for r in trained], marker=".", label=label)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        sched = cfg["split"]["schedule"]
        if sched["policy"] == "lyapunov" and s.get("final_eval_accuracy") is not None:
            by_v.append((max(float(sched["v"]), 1e-3), sum(energy) / len(energy), s["final_eval_accuracy"]))
    if budget:
        axes[0, 1].step([k - 0.5 for k in range(len(budget) + 1)], budget + budget[-1:], where="post", color="k",
                        linestyle="--", label="budget")
    if by_v:
        by_v.sort()
        axes[1, 1].semilogx([v for v, _, _ in by_v], [e for _, e, _ in by_v], marker="o", color="C0", label="avg per device per round")
        twin = axes[1, 1].twinx()
        twin.semilogx([v for v, _, _ in by_v], [a for _, _, a in by_v], marker="s", color="C3", label="final accuracy")
        twin.set_ylabel("final eval accuracy", color="C3")
    labels = [("round", "eval accuracy"), ("device", "spent per round (budgeted quantity)"),
              ("round", "devices scheduled"), ("V (Lyapunov)", "spent per device per round")]
    for ax, (x, y) in zip(axes.flat, labels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_file)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"EdgeLAM run '{summary['name']}' ({summary['strategy']}, {summary['model']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("rounds", str(summary["rounds"]))
    t.add_row("eval loss (round 0 -> final)", f"{summary['first_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}")
    extra = [k.removeprefix("final_eval_") for k in summary if k.startswith("final_eval_")
             and k not in ("final_eval_loss", "final_eval_ppl", "final_eval_tasks") and summary[k] is not None]
    for k in extra:  # the task's own metrics: a classifier's accuracy, a channel predictor's nmse_db
        first = summary.get(f"first_eval_{k}")
        t.add_row(f"eval {k} (round 0 -> final)", f"{first:.4f} -> {summary[f'final_eval_{k}']:.4f}" if first is not None
                  else f"{summary[f'final_eval_{k}']:.4f}")
    if not extra:
        t.add_row("eval perplexity (final)", f"{summary['final_eval_ppl']:.2f}")
    for task, v in sorted((summary.get("final_eval_tasks") or {}).items()):
        for k, value in v.items():
            if k not in ("loss", "adapter") and isinstance(value, (int, float)):
                t.add_row(f"  {k} ({task})", f"{value:.4f}" if k != "ppl" else f"{value:.2f}")
    if "final_backdoor_asr" in summary:
        t.add_row("backdoor success (round 0 -> final)",
                  f"{summary['first_backdoor_asr']:.4f} -> {summary['final_backdoor_asr']:.4f}")
    t.add_row("simulated time", f"{summary['sim_time_s']:.1f} s")
    t.add_row("bytes up / down", f"{_mb(summary['bytes_up_total'])} / {_mb(summary['bytes_down_total'])}")
    t.add_row("device energy", f"{summary['energy_j_total']:.2f} J")
    if "spent_per_round" in summary:  # split runs: each device's time-averaged spending against its budget
        unit = "J" if summary["budget"] == "energy" else "s"
        spent, budget = summary["spent_per_round"], summary["budget_per_device"]
        over = [k for k, (x, b) in enumerate(zip(spent, budget)) if x > b]
        t.add_row(f"{summary['budget']} per device per round", f"max {max(spent):.3f} {unit}, budget {min(budget):.3f} {unit}")
        t.add_row("devices over budget", ", ".join(map(str, over)) or "none")
        t.add_row("times scheduled per device", " ".join(map(str, summary["times_scheduled"])))
    if summary.get("privacy"):  # differential privacy: what the run spent, by dp-accounting
        p = summary["privacy"]
        t.add_row(f"privacy spent ({p['mode']} DP, {p['accountant']})", f"epsilon {p['epsilon']:.3g} at delta {p['delta']:.2g}")
        t.add_row("noise multiplier / clipping norm", f"{p['noise_multiplier']:.4g} / {p['clipping_norm']:.4g}")
    t.add_row("wall time", f"{summary['wall_s']:.1f} s")
    return t
