"""Shared pieces of the air-interface experiment: sizes, a LAM run, mean +- std formatting, plots."""

from __future__ import annotations

import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from edgelam.config import RunConfig
from edgelam.config_load import load_config
from edgelam.lifecycle import run

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]
    rounds: int  # channel prediction: federated rounds
    local_steps: int
    lr: float
    users: int  # user realisations per client (samples = users x BS antennas)
    eval_users: int  # held-out users per CDL profile
    epochs: int  # centralised GRU / LSTM / transformer
    beam_rounds: int
    beam_steps: int
    mlp_epochs: int
    smollm2_rounds: int  # the SmolLM2 comparison (seed 0 only): rounds x local steps, 0 to skip
    smollm2_steps: int


FULL = Sizes(seeds=(0, 1, 2), rounds=30, local_steps=50, lr=0.003, users=64, eval_users=32, epochs=30,
             beam_rounds=12, beam_steps=50, mlp_epochs=500, smollm2_rounds=6, smollm2_steps=10)
QUICK = Sizes(seeds=(0,), rounds=2, local_steps=3, lr=0.003, users=8, eval_users=8, epochs=2,
              beam_rounds=1, beam_steps=3, mlp_epochs=20, smollm2_rounds=1, smollm2_steps=1)

Results = dict[tuple[str, ...], list[float]]  # (table, row, column) -> one value per seed


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {THREADS} torch threads"


def git_rev() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def results() -> Results:
    return defaultdict(list)


def lam_run(config: str, overrides: Sequence[str], out: Path) -> tuple[RunConfig, dict[str, Any]]:
    """One EdgeLAM run of ``configs/<config>`` into ``out``; torch's thread count restored after."""
    cfg = load_config(ROOT / "configs" / config, list(overrides))
    summary = run(cfg, out)
    torch.set_num_threads(THREADS)
    return cfg, summary


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' over seeds, or 'x (one seed)'."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (one seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def table(res: Results, name: str, rows: Sequence[str], cols: Sequence[str], head: Sequence[str],
          digits: int = 2) -> list[str]:
    """A markdown table of ``res[(name, row, col)]``."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(fmt(res.get((name, r, c), []), digits) for c in cols) + " |")
    return lines


def line_plot(res: Results, name: str, rows: Sequence[str], cols: Sequence[str], x: Sequence[float],
              xlabel: str, ylabel: str, path: Path) -> None:
    """One line per row (mean over seeds, std as error bars)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        vals = [res.get((name, r, c), []) for c in cols]
        ys = [mean(v) for v in vals]
        err = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=r)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_plot(res: Results, name: str, rows: Sequence[str], col: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    vals = [res.get((name, r, col), []) for r in rows]
    err = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
    ax.bar(range(len(rows)), [mean(v) for v in vals], yerr=err, capsize=3)
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
