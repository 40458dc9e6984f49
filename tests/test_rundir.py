"""The run folder's lifecycle under a careless or hostile user: resume after corruption, config
drift, --out over a user's files, diverged training. Each case names what must happen."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelam.cli import app

from edgelam.rundir import RunFolder, RunFolderError, RunState, read_rows
from edgelam.store import read_jsonl

OVR = ["fl.rounds=3", "eval.generate=0", "train.local_steps=2"]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def _edgelam(repo: Path, *args: str) -> Done:
    """``edgelam ARGS`` in this process (typer's CliRunner; configs named from the repository root)."""
    args = tuple(str(repo / a) if a.startswith("configs/") else a for a in args)
    res = CliRunner().invoke(app, list(args))
    return Done(res.exit_code, res.stdout, res.stderr)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, request):
    """A finished 3-round tiny run, and a copy of its folder as it was after round 2."""
    repo = Path(request.config.rootpath)
    base = tmp_path_factory.mktemp("runs")
    ref = base / "ref"
    assert _edgelam(repo, "run", "configs/tiny.yaml", *OVR, "--out", str(ref)).returncode == 0
    return repo, ref


def _killed_after(repo: Path, ref: Path, out: Path, rounds: int) -> None:
    """A folder as a run killed after ``rounds`` rounds leaves it: a shorter run of the same config,
    whose config.yaml says 3 rounds (fl.rounds may change on resume)."""
    assert _edgelam(repo, "run", "configs/tiny.yaml", *OVR[1:], f"fl.rounds={rounds}", "--out", str(out)).returncode == 0
    (out / "summary.json").unlink()
    (out / "config.yaml").write_text((ref / "config.yaml").read_text())


def test_torn_last_line_is_dropped_and_recomputed(finished, tmp_path):
    repo, ref = finished
    out = tmp_path / "torn"
    _killed_after(repo, ref, out, 2)
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text + text.splitlines()[1][:40])  # a kill mid-append of round 3
    proc = _edgelam(repo, "run", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert _comparable(read_jsonl(out / "metrics.jsonl")) == _comparable(read_jsonl(ref / "metrics.jsonl"))


@pytest.mark.parametrize("damage", ["cut_inside_row_1", "garbled_middle", "last_row_of_checkpoint_torn"])
def test_damaged_rows_are_refused_and_left_alone(finished, tmp_path, damage):
    repo, ref = finished
    out = tmp_path / damage
    _killed_after(repo, ref, out, 2)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    if damage == "cut_inside_row_1":  # R2: rows 1-2 gone, the checkpoint says round 2
        new = lines[0] + lines[1][:30]
    elif damage == "garbled_middle":  # R3: row 1 garbled, row 2 intact
        new = lines[0] + "{not json\n" + lines[2]
    else:  # R1: the row of the checkpointed round torn
        new = lines[0] + lines[1] + lines[2][:25]
    (out / "metrics.jsonl").write_text(new)
    proc = _edgelam(repo, "run", "--resume", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("lacks the rows of rounds" in proc.stderr) or ("line 2 is damaged" in proc.stderr)
    assert (out / "metrics.jsonl").read_text() == new  # nothing deleted


def test_config_drift_on_resume_is_refused(finished, tmp_path):
    repo, ref = finished
    out = tmp_path / "drift"
    _killed_after(repo, ref, out, 2)
    for old, new in (("seed: 0", "seed: 7"), ("strategy: fedavg", "strategy: fedavgm")):
        cfg = (ref / "config.yaml").read_text()
        assert old in cfg
        (out / "config.yaml").write_text(cfg.replace(old, new))
        proc = _edgelam(repo, "run", "--resume", str(out))
        assert proc.returncode == 2, proc.stderr
        assert "config differs" in proc.stderr and old.split(":")[0] in proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]


def test_damaged_or_missing_checkpoint(finished, tmp_path):
    repo, ref = finished
    out = tmp_path / "ckpt"
    _killed_after(repo, ref, out, 2)
    ckpt = out / "state" / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    proc = _edgelam(repo, "run", "--resume", str(out))
    assert proc.returncode == 2 and "is damaged" in proc.stderr
    ckpt.unlink()
    proc = _edgelam(repo, "run", "--resume", str(out))
    assert proc.returncode == 2 and "is missing" in proc.stderr


def test_out_never_overwrites_user_files(repo, tmp_path):
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my hand-written config\n")
    (mine / "notes.txt").write_text("keep me")
    proc = _edgelam(repo, "run", "configs/tiny.yaml", "--out", str(mine))
    assert proc.returncode == 2 and "other files in it" in proc.stderr
    assert (mine / "config.yaml").read_text() == "# my hand-written config\n"
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = _edgelam(repo, "run", "configs/tiny.yaml", "--out", str(afile))
    assert proc.returncode == 2 and "is a file" in proc.stderr


def test_diverged_training_stops_with_valid_files(repo, tmp_path):
    out = tmp_path / "nan"
    proc = _edgelam(repo, "run", "configs/tiny.yaml", "train.lr=inf", "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "diverged" in proc.stderr and "Traceback" not in proc.stderr
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()


def test_rows_reader_reports_the_damaged_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 0}\n{"round": 1}\n{"round": 2')
    assert read_rows(p) == ([{"round": 0}, {"round": 1}], True)
    p.write_text('{"round": 0}\n[1]\n{"round": 2}\n')
    with pytest.raises(RunFolderError, match="line 2 is damaged"):
        read_rows(p)


def test_summary_is_strict_json(tmp_path):
    folder = RunFolder.create(tmp_path / "r", {"seed": 0})
    folder.write_summary({"loss": float("nan"), "x": [1.0, float("inf")]})
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"loss": None, "x": [1.0, None]}
    folder.checkpoint(RunState(0, 0.0, {}))
    again = RunFolder.open(tmp_path / "r", {"seed": 1})
    with pytest.raises(RunFolderError, match="seed: 0 -> 1"):
        again.resume(lambda: RunState(0, 0.0, {}))
