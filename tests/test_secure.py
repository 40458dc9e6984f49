"""Secure aggregation inside a round: the unmasked aggregate equals the plain one up to quantisation,
its traffic is priced, silent clients are recovered up to the threshold and beyond it the round
fails cleanly; with central DP the clients' noise is accounted; SecAgg at each hierarchical edge."""

from __future__ import annotations

import simpy
import torch

from edgelam.config_load import load_config
from edgelam.fl.driver import FLDriver
from edgelam.fl.rounds import aggregate_input, run_round, select_clients
from edgelam.fl.strategies.base import GLOBAL, get_prefixed
from edgelam.lifecycle import run
from edgelam.store import read_jsonl

FAST = ["fl.rounds=1", "train.local_steps=2", "data.examples_per_task=12", "eval.max_per_task=4"]


def one_round(repo, overrides):
    drv = FLDriver(load_config(repo / "configs/tiny_secagg.yaml", [*FAST, *overrides]))
    try:
        st = drv.initial_state()
        res = run_round(simpy.Environment(), drv.ctx, st, select_clients(drv.ctx, 1), 1)
        updates = aggregate_input(drv.ctx, st, res, 1)
        new = drv.ctx.strategy.aggregate(st.state, updates, 1) if updates else st.state
        return st, res, new
    finally:
        drv.close()


def test_unmasked_aggregate_is_the_plain_one_up_to_quantisation(repo):
    _, plain_res, plain = one_round(repo, ["privacy.secagg.enabled=false", "privacy.secagg.dropout=0"])
    st, res, secure = one_round(repo, ["privacy.secagg.dropout=0"])
    start = get_prefixed(st.state, GLOBAL)
    a, b = get_prefixed(plain, GLOBAL), get_prefixed(secure, GLOBAL)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    err = max(float((a[k] - b[k]).abs().max()) for k in a)
    # 6 clients, 16 bits over [-0.5, 0.5]: each weighted coordinate is off by < one level, 1.5e-5
    assert moved > 1e-3 and err < 6 * 1.6e-5 / (4 / 6)
    assert res.secagg["survivors"] == 6 and res.secagg["saturated"] == 0.0
    # the masked update is one uint32 word per coordinate (delta and the weight) plus a 17-byte header;
    # SecAgg's key and share messages come on top
    dim = sum(t.numel() for t in start.values()) + 1
    got_up = sum(j.cost.bytes_up for j in res.jobs)
    assert got_up - res.secagg["extra_bytes_up"] == 6 * (17 + 4 * dim)
    assert res.end_time_s > plain_res.end_time_s  # the key rounds and unmasking take airtime


def test_silent_clients_up_to_the_threshold_and_beyond(repo):
    st, res, new = one_round(repo, ["privacy.secagg.dropout=0.4"])  # some go silent, >= t = 4 remain
    assert res.secagg["dropped"] and res.secagg["survivors"] >= 4 and "failed" not in res.secagg
    assert sorted(j.client for j in res.dropped) == res.secagg["dropped"]
    assert all(j.cost.bytes_up > 0 and j.cost.t_up_s == 0 for j in res.dropped)  # keys sent, no update
    st, res, new = one_round(repo, ["privacy.secagg.dropout=0.9"])  # too few survive: the round fails
    assert "below the threshold t=4" in res.secagg["failed"] and res.released == []
    assert all(torch.equal(new[k], st.state[k]) for k in st.state)  # the model is unchanged


def test_secagg_with_central_dp_and_at_each_edge(repo, tmp_path):
    cfg = load_config(repo / "configs/tiny_secagg.yaml", [*FAST, "fl.rounds=2", "privacy.dp.mode=central",
                                                          "privacy.dp.noise_multiplier=1.0", "privacy.secagg.clip=4"])
    run(cfg, tmp_path / "dp")
    rows = read_jsonl(tmp_path / "dp" / "metrics.jsonl")
    assert all("failed" not in r["secagg"] for r in rows[1:]) and rows[-1]["privacy"]["epsilon"] > 0
    hier = load_config(repo / "configs/tiny_secagg.yaml", [*FAST, "fl.strategy=hierfavg", "net.num_edge_servers=2",
                                                           "privacy.secagg.threshold=2", "privacy.secagg.dropout=0"])
    run(hier, tmp_path / "hier")
    row = read_jsonl(tmp_path / "hier" / "metrics.jsonl")[-1]
    assert len(row["secagg"]["edges"]) == 2 * hier.fl.hier.kappa2 and row["secagg"]["failed"] == 0
