"""Bad input at the command line gives one line naming the problem (exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _edgelam(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelam.cli", *args], cwd=repo, capture_output=True, text=True)


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00binary\x9c", "not UTF-8"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
])
def test_unreadable_config_files(repo, tmp_path, content, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    proc = _edgelam(repo, "run", str(cfg), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, words", [
    ("seed=-1", "seed must be an integer >= 0"),
    ("fl.deadline_s=5", None),
])
def test_bad_values(repo, tmp_path, override, words):
    if words is None:  # the control: a valid override is not refused by the guard
        override, words = "fl.strategy=fedbuff", "fl.deadline_s"
        proc = _edgelam(repo, "run", "configs/tiny.yaml", override, "fl.deadline_s=5", "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and "applies to synchronous rounds only" in proc.stderr
        return
    proc = _edgelam(repo, "run", "configs/tiny.yaml", override, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_out_folder(repo, tmp_path):
    proc = _edgelam(repo, "run", "configs/tiny.yaml", "--out", "/proc/edgelam-cannot-write/run")
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_unexpected_errors_are_one_line_with_a_hint(repo, tmp_path):
    # a checkpoint that is a folder: not a case the code names, so the last line of defence speaks
    out = tmp_path / "r"
    (out / "state" / "checkpoint.safetensors").mkdir(parents=True)
    (out / "config.yaml").write_text((repo / "configs" / "tiny.yaml").read_text())
    proc = _edgelam(repo, "run", "--resume", str(out))
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")
