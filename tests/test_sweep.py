"""Experiments: a sweep runs its variants, resumes, and writes a table and a figure."""

import subprocess
import sys

import pytest

from edgelam.config import ConfigError
from edgelam.sweep import load_sweep, time_to_loss


def test_time_to_loss():
    rows = [{"eval_loss": 3.0, "sim_time_s": 0.0}, {"eval_loss": None, "sim_time_s": 5.0},
            {"eval_loss": 2.5, "sim_time_s": 9.0}, {"eval_loss": 2.0, "sim_time_s": 12.0}]
    assert time_to_loss(rows, 2.5) == 9.0
    assert time_to_loss(rows, 1.0) is None


def test_sweep_runs_variants_and_tabulates(repo, tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: t\nbase: {repo / 'configs/tiny.yaml'}\ntarget: a\n"
                     "variants:\n  a: [fl.rounds=2]\n  b: [fl.rounds=2, fl.strategy=fedadam, fl.server_lr=0.01]\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgelam.cli", "sweep", str(sweep), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (out / "results.md").read_text()
    assert "| a | fedavg |" in text and "| b | fedadam |" in text and "sim s to loss" in text
    assert (out / "curves.png").stat().st_size > 10_000
    # a second call keeps finished variants
    mtime = (out / "a" / "summary.json").stat().st_mtime
    assert subprocess.run(cmd, cwd=repo, capture_output=True, text=True).returncode == 0
    assert (out / "a" / "summary.json").stat().st_mtime == mtime


def test_bad_sweep_files(repo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {repo / 'configs/tiny.yaml'}\nvariants:\n  a: [fl.roundz=2]\n")
    with pytest.raises(ConfigError, match="unknown key 'fl.roundz'"):
        load_sweep(bad)
    bad.write_text(f"base: {repo / 'configs/tiny.yaml'}\ntarget: zz\nvariants:\n  a: []\n")
    with pytest.raises(ConfigError, match="target 'zz' is not one of the variants"):
        load_sweep(bad)


def test_split_sweep_reports_budgets_and_plots(repo, tmp_path, split_source):
    from edgelam.sweep import run_sweep

    from edgelam.lifecycle import run

    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: t\nbase: {repo / 'configs/tiny_split.yaml'}\ntarget: all\n"
                     f"variants:\n  lyap: [fl.rounds=2, data.source={split_source}]\n"
                     f"  all: [fl.rounds=2, data.source={split_source}, split.schedule.policy=all]\n")
    out = tmp_path / "out"
    run_sweep(sweep, out, lambda cfg, d, resume: run(cfg, d, resume))
    text = (out / "results.md").read_text()
    assert "accuracy (0 -> final)" in text and "vs budget" in text and "MB to loss" in text
    row = next(line for line in text.splitlines() if line.startswith("| all |"))
    assert "| 6.0 |" in row  # every device, every round
    assert (out / "split.png").stat().st_size > 10_000 and "![split](split.png)" in text
