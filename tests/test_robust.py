"""Robust aggregation and hostile clients: Krum / Multi-Krum by hand, the server's gate (names,
shapes, dtypes, NaN / Inf, norm bound), the poisoning attacks by hand, and a scaling attacker that
wrecks FedAvg but not Multi-Krum on a real run."""

from __future__ import annotations

import simpy
import pytest
import torch

from edgelam.config_load import load_config
from edgelam.fl.aggregate import krum_scores, multi_krum
from edgelam.fl.attacks import malicious_clients, poison
from edgelam.fl.driver import FLDriver
from edgelam.fl.rounds import run_round, select_clients
from edgelam.fl.transforms import delta_norm
from edgelam.fl.validate import bound, rejection
from edgelam.lifecycle import run
from edgelam.store import read_jsonl


def st(*xs: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(xs)}


def test_krum_and_multi_krum_by_hand():
    states = [st(0.0), st(1.0), st(2.0), st(100.0)]  # one outlier; n = 4, f = 1: n - f - 2 = 1 neighbour
    # each score: the squared distance to the single nearest other update
    assert krum_scores(states, 1) == [1.0, 1.0, 1.0, 98.0 ** 2]
    assert float(multi_krum(states, [1, 1, 1, 1], 1, 1)["w"]) == 0.0  # Krum: lowest score, lowest index on ties
    assert float(multi_krum(states, [1, 1, 2, 1], 1)["w"]) == pytest.approx((0 + 1 + 4) / 4)  # m = 3, weighted
    with pytest.raises(ValueError, match="n > f \\+ 2"):
        multi_krum(states[:3], [1, 1, 1], 1)


def test_gate_rejects_with_a_reason_and_bounds_norms():
    plan = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert rejection({"a": torch.ones(2, 3), "b": torch.ones(4)}, plan) is None
    assert "missing ['b']" in rejection({"a": torch.ones(2, 3)}, plan)
    assert "shape (3, 2), expected at most (2, 3)" in rejection({"a": torch.ones(3, 2), "b": torch.ones(4)}, plan)
    assert "dtype torch.float16" in rejection({"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(4)}, plan)
    assert "1 NaN or infinite" in rejection({"a": torch.ones(2, 3), "b": torch.tensor([0, float("nan"), 0, 0])}, plan)
    start, upd = {"w": torch.zeros(2)}, {"w": torch.tensor([3.0, 4.0])}
    assert torch.allclose(bound(upd, start, 1.0)["w"], torch.tensor([0.6, 0.8]))
    assert bound(upd, start, None) is upd


def test_poisoning_attacks_by_hand():
    start, upd = st(1.0, 1.0), st(2.0, 0.0)  # delta (1, -1)
    assert torch.equal(poison("sign_flip", upd, start, 2.0, 0)["w"], torch.tensor([-1.0, 3.0]))
    assert torch.equal(poison("scaling", upd, start, 10.0, 0)["w"], torch.tensor([11.0, -9.0]))
    noisy = poison("gaussian", {"w": torch.zeros(100_000)}, {"w": torch.zeros(100_000)}, 0.5, 1)["w"]
    assert abs(float(noisy.std()) - 0.5) < 0.01
    bad = malicious_clients(10, 0.3, 0)
    assert len(bad) == 3 and bad == malicious_clients(10, 0.3, 0) and bad != malicious_clients(10, 0.3, 1)


def test_a_nan_update_is_rejected_and_the_round_goes_on(repo):
    drv = FLDriver(load_config(repo / "configs/tiny.yaml", ["fl.rounds=1", "train.local_steps=1", "fl.norm_bound=0.01"]))

    class NaNFromClient0:
        def __call__(self, update, start, trip):
            return {k: v * float("nan") for k, v in update.items()} if trip.client == 0 else update

        def on_cohort(self, clients, round_idx):
            return None

    try:
        drv.ctx.chain.append(NaNFromClient0())
        st0 = drv.initial_state()
        res = run_round(simpy.Environment(), drv.ctx, st0, select_clients(drv.ctx, 1), 1)
        assert [j.client for j in res.rejected] == [0] and "NaN or infinite" in res.rejected[0].rejected
        assert sorted(j.client for j in res.jobs) == [1, 2]
        assert all(delta_norm(j.update.state, j.start) <= 0.01 * (1 + 1e-5) for j in res.jobs)  # norm-bounded
    finally:
        drv.close()


def test_a_sign_flipping_attacker_wrecks_fedavg_not_multi_krum(repo, tmp_path):
    base = ["data.num_clients=6", "data.partition=iid", "fl.rounds=2", "train.local_steps=2", "eval.generate=0",
            "eval.client_heldout=false", "threads=1"]
    attack = ["fl.attack.kind=sign_flip", "fl.attack.fraction=0.17", "fl.attack.scale=20"]
    loss, first = {}, 0.0
    for name, extra in (("clean", []), ("fedavg", attack), ("multi_krum", [*attack, "fl.aggregator=multi_krum",
                                                                           "fl.byzantine=1"])):
        summary = run(load_config(repo / "configs/tiny.yaml", [*base, *extra]), tmp_path / name)
        loss[name], first = summary["final_eval_loss"], summary["first_eval_loss"]
    # one of six clients, flipped and scaled 20x, undoes FedAvg's training (worse than the untrained model,
    # where the clean run improves); Multi-Krum drops it and lands on the clean run's loss
    assert loss["clean"] < first - 0.02 and loss["fedavg"] > first
    assert abs(loss["multi_krum"] - loss["clean"]) < 0.002 * loss["clean"]


def test_signed_updates_refuse_a_tampered_uplink(repo, tmp_path):
    from edgelam.fl.signing import MAC_BYTES, Uplink
    from edgelam.models.lora import serialize
    from edgelam.security.keys import make_keyring

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    blob = serialize(state)
    signed = Uplink(make_keyring(["client0", "client1"]), frozenset({1}), seed=0)
    got, why = signed.receive(0, 3, 77, *signed.carry(0, 3, 77, blob))
    assert why == "" and torch.equal(got["a"], state["a"])  # an honest link: the update as sent
    assert "MAC does not verify for client1" in signed.receive(1, 3, 77, *signed.carry(1, 3, 77, blob))[1]
    assert "MAC does not verify" in signed.receive(0, 4, 77, *signed.carry(0, 3, 77, blob))[1]  # another version
    bare = Uplink(None, frozenset({1}), seed=0)
    arrived, mac = bare.carry(1, 3, 77, blob)
    assert mac is None and sum(bin(x ^ y).count("1") for x, y in zip(arrived, blob)) == 1  # one bit flipped
    # a run: the tampered client's updates are refused every round, the others' carry their MAC's bytes
    cfg = load_config(repo / "configs/tiny.yaml", ["fl.rounds=2", "train.local_steps=1", "eval.generate=0",
                                                   "fl.attack.kind=tamper", "fl.attack.fraction=0.34", "fl.keys=auto"])
    run(cfg, tmp_path / "signed")
    rows = read_jsonl(tmp_path / "signed" / "metrics.jsonl")[1:]
    [bad] = malicious_clients(3, 0.34, 0)
    assert all([r["client"] for r in row["rejected"]] == [bad] and "MAC does not verify" in row["rejected"][0]["reason"]
               for row in rows)
    plain = load_config(repo / "configs/tiny.yaml", ["fl.rounds=1", "train.local_steps=1", "eval.generate=0"])
    run(plain, tmp_path / "plain")
    per_client = {c["client"]: c["bytes_up"] for c in read_jsonl(tmp_path / "plain" / "metrics.jsonl")[1]["client_stats"]}
    assert all(c["bytes_up"] == per_client[c["client"]] + MAC_BYTES for c in rows[0]["client_stats"])


def test_rank_heterogeneous_uploads_pass_the_norm_bound_and_attacks(repo, tmp_path):
    """A rank-r_k upload is measured against the leading r_k components of its start."""
    cfg = load_config(repo / "configs/tiny_hetero_rank.yaml", ["fl.rounds=1", "fl.norm_bound=0.01", "eval.generate=0",
                                                               "fl.attack.kind=sign_flip", "fl.attack.fraction=0.3"])
    run(cfg, tmp_path / "run")
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
    assert row["clients"] and all(c["delta_norm"] > 0 for c in row["client_stats"])
