"""Differential privacy: clipping, the noise's scale, the accountant against dp-accounting itself,
DP-FedAvg's release by hand, the asynchronous ledger from what happened, resume, config errors."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from safetensors import safe_open

from edgelam.config_checks import ConfigError
from edgelam.config_load import load_config
from edgelam.fl.transforms import Trip, delta_norm
from edgelam.lifecycle import run
from edgelam.privacy import accountant as acc
from edgelam.privacy.dp import noised_mean, poisson_select
from edgelam.privacy.mechanism import LocalNoise
from edgelam.store import read_jsonl

SMALL = ["data.num_clients=6", "data.examples_per_task=12", "fl.rounds=2"]


def ledger_of(out) -> acc.Ledger:
    with safe_open(str(out / "state/checkpoint.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["edgelam"])
    return acc.from_json(meta["aux"]["privacy"])


def test_noised_mean_by_hand_and_noise_scale():
    start = {"w": torch.zeros(2)}
    ups = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
    z = {"w": torch.tensor([0.5, -0.5], dtype=torch.float64)}
    # (sum of deltas + z) / (q N) with q N = 4: ([1, 2] + [0.5, -0.5]) / 4
    assert torch.allclose(noised_mean(start, ups, 4.0, z)["w"], torch.tensor([0.375, 0.375]))
    # local DP: the noise added to an update has std sigma * C (200k coordinates: 3 % tolerance)
    big = {"w": torch.zeros(200_000)}
    noised = LocalNoise(sigma=1.5, clip=0.4, seed=0)(big, big, Trip(3, 1, 7))["w"].double()
    assert abs(float(noised.std()) / 0.6 - 1) < 0.03 and abs(float(noised.mean())) < 0.01
    again = LocalNoise(sigma=1.5, clip=0.4, seed=0)(big, big, Trip(3, 1, 8))["w"]
    assert not torch.equal(noised.float(), again)  # another trip, other noise


def test_poisson_sampling_rate_and_exclusion_keeps_other_draws():
    picks = [poisson_select(1000, 0.3, np.random.default_rng(s)) for s in range(5)]
    assert all(abs(len(p) / 1000 - 0.3) < 0.05 for p in picks)
    a = poisson_select(50, 0.4, np.random.default_rng(1))
    b = poisson_select(50, 0.4, np.random.default_rng(1), excluded=[a[0]])
    assert b == a[1:]


def test_accountant_matches_dp_accounting_and_calibrates():
    steps = {(0.1, 1.1): 40, (1.0, 3.0): 2}
    ev = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 40),
                              dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(3.0), 2)])
    assert acc.epsilon(steps, 1e-5) == pytest.approx(rdp.RdpAccountant().compose(ev).get_epsilon(1e-5), rel=1e-12)
    assert acc.epsilon(steps, 1e-5, "pld") < acc.epsilon(steps, 1e-5)  # PLD is tighter
    sigma = acc.calibrate_sigma(lambda s: {(0.2, s): 30}, 4.0, 1e-5)
    assert acc.epsilon({(0.2, sigma): 30}, 1e-5) == pytest.approx(4.0, rel=1e-3)


def test_dp_fedavg_run_clips_and_accounts(repo, tmp_path):
    cfg = load_config(repo / "configs/tiny_dp.yaml", [*SMALL, "privacy.unlearn.store_updates=true"])
    summary = run(cfg, tmp_path / "dp")
    rows = read_jsonl(tmp_path / "dp" / "metrics.jsonl")
    p = rows[-1]["privacy"]
    # sigma was calibrated so the planned 2 rounds at q = 0.5 spend the target epsilon, and they did
    assert p["epsilon"] == pytest.approx(8.0, rel=1e-3) and summary["privacy"]["epsilon"] == p["epsilon"]
    ev = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(p["noise_multiplier"])), 2)
    assert p["epsilon"] == pytest.approx(rdp.RdpAccountant().compose(ev).get_epsilon(p["delta"]), rel=1e-9)
    assert p["delta"] == pytest.approx(1 / 60)
    assert rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"]
    assert ledger_of(tmp_path / "dp") == {"all": {(0.5, p["noise_multiplier"]): 2},
                                         "global": {(0.5, p["noise_multiplier"]): 2}}


def test_every_sent_update_is_clipped(repo, tmp_path):
    from edgelam.fl.driver import FLDriver
    from edgelam.fl.rounds import run_round, select_clients
    import simpy

    cfg = load_config(repo / "configs/tiny_dp.yaml", [*SMALL, "privacy.dp.clipping_norm=0.01", "train.lr=0.05"])
    drv = FLDriver(cfg)
    try:
        st = drv.initial_state()
        res = run_round(simpy.Environment(), drv.ctx, st, select_clients(drv.ctx, 1), 1)
        norms = [delta_norm(j.update.state, j.start) for j in res.jobs]
        assert res.jobs and all(n <= 0.01 * (1 + 1e-5) for n in norms) and max(norms) > 0.0099  # clipped, not tiny
    finally:
        drv.close()


def test_dp_fedbuff_ledger_is_what_happened_and_resumes(repo, tmp_path):
    cfg = load_config(repo / "configs/tiny_dp_async.yaml", ["fl.rounds=3", "eval.every=3", "eval.max_per_task=4"])
    ref = run(cfg, tmp_path / "ref")
    rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    # by hand from the metrics: per step, a client's sensitivity is the sum of its (tau + 1)^-0.5
    expected: acc.Ledger = {}
    for r in rows[1:]:
        weights: dict[int, float] = {}
        for c in r["client_stats"]:
            weights[c["client"]] = weights.get(c["client"], 0.0) + (c["staleness"] + 1) ** -0.5
        for k, w in weights.items():
            acc.record(expected, f"client{k}", 1.0, 1.0 / w)
    ledger = ledger_of(tmp_path / "ref")
    assert ledger.keys() == expected.keys()
    for party in expected:
        got, want = sorted(ledger[party].items()), sorted(expected[party].items())
        assert [c for _, c in got] == [c for _, c in want]
        assert [s for (_, s), _ in got] == pytest.approx([s for (_, s), _ in want], rel=1e-12)
    worst = max(acc.epsilon(s, rows[-1]["privacy"]["delta"]) for s in expected.values())
    assert rows[-1]["dp_epsilon"] == pytest.approx(worst)

    class Crash(Exception):
        pass

    def crash(row):
        if row["round"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashed", on_round=crash)
    resumed = run(cfg, tmp_path / "crashed", resume=True)
    assert resumed["final_eval_loss"] == ref["final_eval_loss"] and resumed["privacy"] == ref["privacy"]


@pytest.mark.parametrize("overrides, key", [
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=0"], "privacy.dp.noise_multiplier"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=-1"], "privacy.dp.noise_multiplier"),
    (["privacy.dp.mode=central"], "privacy.dp needs exactly one"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1", "privacy.dp.target_delta=0.5"], "1/n = 1/3"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1", "fl.strategy=cfl"], "fl.strategy"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1", "fl.aggregator=median"], "fl.aggregator"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1", "fl.uplink=[clip]"], "fl.uplink"),
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1", "fl.strategy=hierfavg", "privacy.dp.noise_at=cloud",
      "fl.hier.kappa2=2"], "kappa2 = 1"),
    (["privacy.secagg.enabled=true", "privacy.secagg.threshold=4"], "cohort size 3"),
    (["privacy.secagg.enabled=true", "fl.strategy=fedasync"], "needs a cohort"),
    (["privacy.unlearn.exclude=[7]"], "clients 0..2"),
])
def test_impossible_privacy_settings_are_refused(repo, overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        load_config(repo / "configs/tiny.yaml", overrides)


def test_dpsgd_delta_is_checked_against_the_smallest_client(repo):
    from edgelam.fl.driver import FLDriver

    cfg = load_config(repo / "configs/tiny.yaml", ["privacy.dp.mode=sample", "privacy.dp.noise_multiplier=1",
                                                   "privacy.dp.target_delta=0.2"])
    with pytest.raises(ConfigError, match="smallest client"):
        FLDriver(cfg)
    assert math.isfinite(acc.epsilon({(0.1, 1.0): 10}, 1e-5))


@pytest.mark.parametrize("overrides, parties", [
    (["fl.strategy=rescluster", "fl.cluster.num_clusters=2"], {"all", "c0", "c1"}),  # per-cluster accounting
    (["fl.strategy=hierfavg", "net.num_edge_servers=2"], {"all"}),  # noise at each edge: sigma / sqrt(kappa2)
    (["fl.strategy=hierfavg", "privacy.dp.noise_at=cloud", "fl.hier.kappa2=1"], {"all"}),
    (["fl.strategy=fedasync", "privacy.dp.mode=local"], None),  # every upload of every device
])
def test_dp_with_clustered_hierarchical_and_async_schemes(repo, tmp_path, overrides, parties):
    cfg = load_config(repo / "configs/tiny_dp.yaml", [*SMALL, "fl.rounds=1", "fl.fraction=1", "train.local_steps=1",
                                                     "fl.hier.kappa1=1", "privacy.dp.target_epsilon=null",
                                                     "privacy.dp.noise_multiplier=1.5", *overrides])
    run(cfg, tmp_path / "run")
    rows, ledger = read_jsonl(tmp_path / "run" / "metrics.jsonl"), ledger_of(tmp_path / "run")
    p = rows[-1]["privacy"]
    if parties is None:  # local DP: one Gaussian step per upload, per client
        uploads = [c["client"] for r in rows[1:] for c in r["client_stats"]]
        assert sum(sum(s.values()) for s in ledger.values()) == len(uploads)
        assert p["epsilon_clients"]["count"] == len(set(uploads))
        return
    assert set(ledger) == parties
    sigma = 1.5 / math.sqrt(cfg.fl.hier.kappa2) if "hierfavg" in overrides[0] and "cloud" not in str(overrides) else 1.5
    [((q, s), count)] = ledger["all"].items()
    assert q == 1.0 and s == pytest.approx(sigma) and count == 1
    assert p["epsilon"] == pytest.approx(acc.epsilon({(1.0, sigma): 1}, p["delta"]))
    if "c1" in parties:
        assert set(p["epsilon_per_cluster"]) == {"c0", "c1"}
