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


def plot_runs(run_dirs: Sequence[Path], out_file: Path) -> Path:
    """Eval loss and perplexity against round and against simulated time; one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run_dir in run_dirs:
        label, rows = load_run(Path(run_dir))
        ev = [r for r in rows if r.get("eval_loss") is not None]
        rounds = [r["round"] for r in ev]
        times = [r["sim_time_s"] for r in ev]
        axes[0, 0].plot(rounds, [r["eval_loss"] for r in ev], marker="o", label=label)
        axes[0, 1].plot(rounds, [r["eval_ppl"] for r in ev], marker="o", label=label)
        axes[1, 0].plot(times, [r["eval_loss"] for r in ev], marker="o", label=label)
        trained = [r for r in rows if r.get("train_loss") is not None]
        axes[1, 1].plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker=".", label=label)
    titles = [("round", "eval loss"), ("round", "eval perplexity"), ("simulated time (s)", "eval loss"), ("round", "train loss")]
    for ax, (x, y) in zip(axes.flat, titles):
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.stem}.tmp{out_file.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_file)
    return out_file


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"EdgeLAM run '{summary['name']}' ({summary['strategy']}, {summary['model']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("rounds", str(summary["rounds"]))
    t.add_row("eval loss (round 0 -> final)", f"{summary['first_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}")
    t.add_row("eval perplexity (final)", f"{summary['final_eval_ppl']:.2f}")
    for task, v in sorted((summary.get("final_eval_tasks") or {}).items()):
        t.add_row(f"  ppl ({task})", f"{v['ppl']:.2f}")
    t.add_row("simulated time", f"{summary['sim_time_s']:.1f} s")
    t.add_row("bytes up / down", f"{_mb(summary['bytes_up_total'])} / {_mb(summary['bytes_down_total'])}")
    t.add_row("device energy", f"{summary['energy_j_total']:.2f} J")
    t.add_row("wall time", f"{summary['wall_s']:.1f} s")
    return t
