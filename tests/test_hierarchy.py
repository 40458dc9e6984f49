"""Hierarchical federated LoRA: two tiers timed and counted separately, against the flat scheme."""

import pytest

from edgelam.config_load import load_config
from edgelam.lifecycle import run
from edgelam.store import read_jsonl


def test_hierfavg_counts_each_tier(repo, tmp_path):
    cfg = load_config(repo / "configs/tiny_hierarchical.yaml")
    summary = run(cfg, tmp_path / "hier")
    rows = read_jsonl(tmp_path / "hier" / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] and summary["rounds"] == 2
    row = rows[1]
    per_adapter = row["client_stats"][0]["bytes_up"]
    edges = {0, 1}
    # kappa2 = 2 edge rounds x 8 devices over the air; 2 edge models up and down the backhaul
    assert len(row["client_stats"]) == 2 * 8
    assert row["bytes_up"] == 2 * 8 * per_adapter
    assert row["bytes_backhaul_up"] == row["bytes_backhaul_down"] == len(edges) * per_adapter
    assert all(c["steps"] == cfg.fl.hier.kappa1 for c in row["client_stats"])
    # the round lasts at least the backhaul both ways plus two edge rounds
    assert row["round_time_s"] > 2 * cfg.net.backhaul_latency_s


def test_flat_via_cloud_sends_every_update_over_the_backhaul(repo, tmp_path):
    cfg = load_config(repo / "configs/tiny_hierarchical.yaml", ["fl.strategy=fedavg", "train.local_steps=4"])
    run(cfg, tmp_path / "flat")
    row = read_jsonl(tmp_path / "flat" / "metrics.jsonl")[1]
    assert row["bytes_backhaul_up"] == row["bytes_up"] == 8 * row["client_stats"][0]["bytes_up"]
    for c in row["client_stats"]:  # each device leg includes the backhaul latency
        assert c["t_up_s"] > cfg.net.backhaul_latency_s


def test_unknown_hier_key_is_named(repo):
    from edgelam.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key 'fl.hier.kappa3'"):
        load_config(repo / "configs/tiny_hierarchical.yaml", ["fl.hier.kappa3=1"])
