"""End to end through the CLI: the run-folder contract, determinism, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from peft import PeftModel
from typer.testing import CliRunner

from edgelam.cli import app

from edgelam.store import read_jsonl

REQUIRED = {"round", "sim_time_s", "train_loss", "eval_loss", "eval_ppl", "eval_tasks", "bytes_up", "bytes_down",
            "energy_j", "clients"}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def _edgelam(repo: Path, *args: str, own_process: bool = False) -> Done:
    """``edgelam ARGS``: in this process (typer's CliRunner, configs named from the repository root),
    or as its own process (the installed entry point, as a user runs it)."""
    if own_process:
        proc = subprocess.run([sys.executable, "-m", "edgelam.cli", *args], cwd=repo, capture_output=True, text=True)
        return Done(proc.returncode, proc.stdout, proc.stderr)
    res = CliRunner().invoke(app, [str(repo / a) if a.startswith("configs/") else a for a in args])
    return Done(res.exit_code, res.stdout, res.stderr)


def _comparable(rows):
    # wall-clock time is the one thing allowed to differ between identical runs
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_tiny_config_through_the_cli(repo, tmp_path):
    out = tmp_path / "run"
    proc = _edgelam(repo, "run", "configs/tiny.yaml", "--out", str(out), own_process=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("data: ")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert REQUIRED <= set(r)
        assert r["bytes_up"] > 0 and r["energy_j"] > 0 and r["sim_time_s"] > 0
        assert set(r["eval_tasks"]) == {"arithmetic", "reverse", "capital"}
    assert rows[2]["sim_time_s"] > rows[1]["sim_time_s"]
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]  # fine-tuning helps on held-out data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_eval_loss"] == rows[2]["eval_loss"]
    assert (out / "config.yaml").is_file() and (out / "plots" / "curves.png").stat().st_size > 10_000
    assert len(read_jsonl(out / "samples.jsonl")) == 2
    # the adapter loads with PEFT onto a fresh base
    from edgelam.models.load import byte_tokenizer, tiny_model

    PeftModel.from_pretrained(tiny_model(len(byte_tokenizer())), out / "adapter")
    # a second run into the same folder is refused, pointing at --resume
    again = _edgelam(repo, "run", "configs/tiny.yaml", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr


def test_same_seed_same_metrics_other_seed_differs(repo, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = _edgelam(repo, "run", "configs/tiny.yaml", f"seed={seed}", "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        runs.append(_comparable(read_jsonl(tmp_path / name / "metrics.jsonl")))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_kill_minus_nine_then_resume_matches_uninterrupted(repo, tmp_path):
    overrides = ["fl.rounds=12", "train.local_steps=6", "eval.generate=0"]
    # every run of this test in its own process: the same torch thread count as the killed one
    ref = _edgelam(repo, "run", "configs/tiny.yaml", *overrides, "--out", str(tmp_path / "ref"), own_process=True)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "run", "configs/tiny.yaml", *overrides, "--out", str(out)],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(out / "metrics.jsonl")) < 4:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_jsonl(out / "metrics.jsonl"))
    assert 4 <= done < 13, f"the kill must land mid-run (saw {done} rows)"
    assert not (out / "summary.json").exists()

    resumed = _edgelam(repo, "run", "--resume", str(out), own_process=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _comparable(read_jsonl(out / "metrics.jsonl")) == _comparable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["final_eval_loss"] == ref_summary["final_eval_loss"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam"])
def test_other_strategies_run(repo, tmp_path, strategy):
    proc = _edgelam(repo, "run", "configs/tiny.yaml", f"fl.strategy={strategy}", "train.prox_mu=0.01",
                    "eval.generate=0", "--out", str(tmp_path / strategy))
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / strategy / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_plot_several_runs(repo, tmp_path):
    for name in ("x", "y"):
        assert _edgelam(repo, "run", "configs/tiny.yaml", "fl.rounds=1", "--out", str(tmp_path / name)).returncode == 0
    proc = _edgelam(repo, "plot", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "both.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "both.png").stat().st_size > 10_000
    bad = _edgelam(repo, "plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "z.png"))
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_ls_lists_everything(repo):
    proc = _edgelam(repo, "ls")
    assert proc.returncode == 0
    for word in ("fedavg", "fedadam", "smollm2", "tiny.yaml", "demo.yaml", "arithmetic"):
        assert word in proc.stdout
