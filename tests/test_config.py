"""Config loading: overrides, unknown keys, wrong types and impossible values give clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from edgelam.config import ConfigError
from edgelam.config_load import config_from_dict, load_config


def test_overrides_and_types(repo):
    cfg = load_config(repo / "configs/tiny.yaml", ["fl.rounds=5", "train.lr=1e-4", "model.lora.target_modules=[q_proj]"])
    assert cfg.fl.rounds == 5
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; coerced
    assert cfg.model.lora.target_modules == ("q_proj",)


@pytest.mark.parametrize("data, match", [
    ({"fl": {"roundz": 3}}, r"unknown key 'fl.roundz'; allowed keys here: strategy, rounds"),
    ({"fl": {"rounds": "three"}}, r"fl.rounds must be an integer"),
    ({"fl": {"rounds": 0}}, r"fl.rounds must be >= 1"),
    ({"fl": {"strategy": "fedfoo"}}, r"fl.strategy must be one of \[.*'fedavg'.*\] \(got 'fedfoo'\)"),
    ({"train": {"lr": -1}}, r"train.lr must be > 0"),
    ({"net": {"device_cpu_hz": [2e9, 1e9]}}, r"net.device_cpu_hz must be a \[low, high\] range"),
    ({"data": {"partition": "presplit"}}, r"'presplit' needs data.source 'dolly'"),
    ({"model": {"lora": {"r": 0}}}, r"model.lora.r must be >= 1"),
    ({"eval": {"every": True}}, r"eval.every must be an integer"),
    ({"data": "x"}, r"data must be a mapping"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like key=value"):
        config_from_dict({}, ["fl.rounds"])


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, repo):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fl:\n  rounds: -2\n")
    cmd = [sys.executable, "-m", "edgelam.cli", "run", str(bad), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2
    assert "fl.rounds must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_reports_missing_data_path(tmp_path: Path, repo):
    cmd = [sys.executable, "-m", "edgelam.cli", "run", "configs/tiny.yaml", "data.source=files",
           "data.files=[no/such/file.json]", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2
    assert "data path 'no/such/file.json' not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_shipped_config_loads(repo) -> None:
    """Each YAML in configs/ is a valid run config or serving topology (a predict topology names a
    run folder made by its own header's command, so only its run check is left out)."""
    import yaml

    from edgelam.infer.topology import load_topology

    files = sorted((repo / "configs").glob("*.yaml"))
    assert len(files) >= 20
    for path in files:
        raw = yaml.safe_load(path.read_text())
        if "mode" not in raw:
            load_config(path)
        elif raw["mode"] != "predict":
            load_topology(path)
