"""Injected faults (``faults``): drop-outs mid-trip cut and charged by hand, stragglers slowed,
every driver finishes with the lost work in its metrics, and a full disk while writing a
checkpoint leaves the old one whole while the run goes on and a resume stays exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.config_schemes import FaultConfig
from edgelam.fl import faults
from edgelam.lifecycle import run
from edgelam.net.topology import ClientCost
from edgelam.rundir import RunFolder, RunFolderError, load_checkpoint
from edgelam.store import read_jsonl

COST = ClientCost(t_down_s=2.0, t_comp_s=10.0, t_up_s=4.0, e_tx_j=8.0, e_comp_j=20.0, bytes_down=1000, bytes_up=600, flops=1e9)


def test_a_dropped_trip_is_cut_where_it_stopped_and_a_straggler_slowed():
    down = faults.apply(COST, faults.Fault("download", 0.25), 10.0)
    assert (down.t_down_s, down.bytes_down, down.t_comp_s, down.e_comp_j, down.bytes_up, down.e_tx_j) == (0.5, 250, 0, 0, 0, 0)
    train = faults.apply(COST, faults.Fault("train", 0.5), 10.0)
    assert (train.t_down_s, train.bytes_down, train.t_comp_s, train.e_comp_j, train.bytes_up, train.t_up_s) == (2.0, 1000, 5.0,
                                                                                                               10.0, 0, 0)
    up = faults.apply(COST, faults.Fault("upload", 0.5, straggled=True), 10.0)
    assert (up.t_comp_s, up.e_comp_j, up.t_up_s, up.bytes_up, up.e_tx_j) == (100.0, 20.0, 2.0, 300, 4.0)  # same work, 10x time
    assert faults.apply(COST, faults.Fault(), 10.0) == COST
    cfg = FaultConfig(drop=0.3, straggle=0.2)
    draws = [faults.draw(cfg, 0, s) for s in range(2000)]
    assert draws == [faults.draw(cfg, 0, s) for s in range(2000)]  # a resumed run redraws the same faults
    assert abs(sum(d.phase is not None for d in draws) / 2000 - 0.3) < 0.03
    assert abs(sum(d.straggled for d in draws) / 2000 - 0.2) < 0.03
    assert {d.phase for d in draws} == {None, "download", "train", "upload"}
    assert {faults.draw(dataclasses.replace(cfg, drop_phase="upload"), 0, s).phase for s in range(200)} == {None, "upload"}


def check_lost_work(rows: list[dict], n_clients: int, rounds: bool = True) -> int:
    """Every lost trip is listed, charged only what it spent, and (in rounds: one trip per client)
    never among the arrived clients; under asynchrony, or over a hierarchical round's several edge
    steps, a device may lose one trip and land the next."""
    lost = 0
    for r in rows[1:]:
        for f in r.get("faults", []):
            assert f["phase"] in ("download", "train", "upload") and not (rounds and f["client"] in r["clients"])
            assert 0 <= f["share"] <= 1 and 0 <= f["client"] < n_clients
            lost += 1
        arrived = sum(c["bytes_up"] for c in r["client_stats"])
        assert r["bytes_up"] >= arrived  # plus the part lost uploads sent
    return lost


@pytest.mark.parametrize("config", ["tiny_fedbuff.yaml", "tiny_hierarchical.yaml"])
def test_async_and_hierarchical_runs_finish_with_drop_outs_accounted(repo, tmp_path, config):
    cfg = load_config(repo / "configs" / config, ["faults.drop=0.4", "faults.straggle=0.3", "eval.every=100"])
    summary = run(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["rounds"] == cfg.fl.rounds and check_lost_work(rows, cfg.data.num_clients, False) > 0
    assert any(r.get("stragglers") for r in rows)


def test_sync_faults_and_a_full_disk_survived_and_resume_exact(repo, tmp_path):
    over = ["fl.rounds=3", "data.num_clients=4", "faults.drop=0.35", "faults.straggle=0.3", "faults.disk_full_at=2",
            "eval.generate=0"]
    whole = run(load_config(repo / "configs/tiny.yaml", over), tmp_path / "whole")
    assert whole["rounds"] == 3 and whole["checkpoints_skipped"] == [2]
    rows = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert check_lost_work(rows, 4) > 0
    assert not list((tmp_path / "whole").rglob("*.tmp"))  # the half-written checkpoint was removed
    # stopped after round 2, whose checkpoint met the full disk: the folder holds round 1's checkpoint
    # and round 2's row; the resume recomputes round 2 (the drill fills the disk again) and round 3
    part = load_config(repo / "configs/tiny.yaml", [*(o for o in over if o != "fl.rounds=3"), "fl.rounds=2"])
    run(part, tmp_path / "part")
    assert load_checkpoint(tmp_path / "part" / "state" / "checkpoint.safetensors")[0].round == 1
    resumed = run(dataclasses.replace(part, fl=dataclasses.replace(part.fl, rounds=3)), tmp_path / "part", resume=True)
    assert resumed["rounds"] == 3
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == strip(rows)


def test_faults_that_cannot_apply_are_refused(repo):
    with pytest.raises(ConfigError, match="faults.drop must be in"):
        load_config(repo / "configs/tiny.yaml", ["faults.drop=1"])
    with pytest.raises(ConfigError, match="faults.drop_phase must be one of"):
        load_config(repo / "configs/tiny.yaml", ["faults.drop_phase=compute"])
    with pytest.raises(ConfigError, match="split learning"):
        load_config(repo / "configs/tiny_split.yaml", ["faults.drop=0.1"])
    with pytest.raises(ConfigError, match="secure aggregation"):
        load_config(repo / "configs/tiny_secagg.yaml", ["faults.drop=0.1"])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_metrics_stops_the_run_with_the_fix(tmp_path: Path):
    folder = RunFolder.create(tmp_path / "r", {"name": "x"})
    (tmp_path / "r" / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(RunFolderError, match="No space left on device .*free space and resume with `edgelam run --resume"):
        folder.append({"round": 0})
