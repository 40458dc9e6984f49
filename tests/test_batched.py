"""Batched multi-adapter training (fl/batched.py): clients trained in one forward / backward give the
updates sequential training gives, their trips cost what they cost alone, and the model is left as
it was (no adapter slot survives the call)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.fl.batched import BatchedExecutor, groups
from edgelam.fl.driver import FLDriver
from edgelam.fl.executor import LocalExecutor
from edgelam.fl.rounds import make_work
from edgelam.lifecycle import run
from edgelam.store import Purpose, torch_seed_for


def _works(drv: FLDriver, clients: range, version: int = 1, state: dict | None = None) -> list:
    ctx, state = drv.ctx, drv.initial_state().state if state is None else state
    return [make_work(ctx, state, version, k, torch_seed_for(0, Purpose.TRAIN, version, k)) for k in clients]


def _close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.mark.parametrize("extra", [
    [],  # plain FedAvg trips
    ["train.prox_mu=0.1", "train.grad_accum=2", "train.max_grad_norm=0.5", "train.batch_size=3"],  # FedProx, accumulation, clipping
])
def test_batched_updates_equal_sequential(repo, extra):
    drv = FLDriver(load_config(repo / "configs" / "tiny.yaml", ["data.num_clients=4", "threads=1", *extra]))
    try:
        ctx = drv.ctx
        works = _works(drv, range(4))
        before = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
        seq = LocalExecutor(ctx).run(works)
        bat = BatchedExecutor(ctx, 4).run(works)
        for s, b in zip(seq, bat):
            moved = max(float((s.update.state[k] - s.start[k]).abs().max()) for k in s.start)
            assert moved > 1e-3  # the trips trained
            assert _close(s.update.state, b.update.state, atol=1e-6)
            assert math.isclose(s.update.train_loss, b.update.train_loss, rel_tol=1e-6)
            # the cost is each client's own: padded to its own batches, not the shared one
            assert (s.update.tokens, s.update.flops, s.update.steps) == (b.update.tokens, b.update.flops, b.update.steps)
            assert s.update.client == b.update.client and s.update.adapter == b.update.adapter
        assert list(ctx.model.peft_config) == ["default"]  # the slots are gone
        assert {n for n, p in ctx.model.named_parameters() if p.requires_grad} == before
        assert _close(LocalExecutor(ctx).run(works[:1])[0].update.state, seq[0].update.state, atol=0)  # model untouched
    finally:
        drv.close()


def test_clustered_trips_probe_then_train_together(repo):
    """IFCA: each client probes the cluster adapters and trains the one it picks, in the shared batch."""
    drv = FLDriver(load_config(repo / "configs" / "tiny_clustered.yaml", ["fl.strategy=ifca", "threads=1"]))
    try:
        ctx, clients = drv.ctx, range(len(drv.ctx.data.clients))
        warm = LocalExecutor(ctx).run(_works(drv, clients))  # the warm-up round seeds two different clusters
        state = ctx.strategy.aggregate(drv.initial_state().state, [r.update for r in warm], 1)
        works = _works(drv, clients, 2, state)
        assert works[0].candidates
        seq = LocalExecutor(drv.ctx).run(works)
        bat = BatchedExecutor(drv.ctx, 8).run(works)
        for s, b in zip(seq, bat):
            assert (s.update.adapter, s.probe_flops) == (b.update.adapter, b.probe_flops)
            assert _close(s.start, b.start, atol=0)
            assert _close(s.update.state, b.update.state, atol=1e-6)
        assert len({r.update.adapter for r in bat}) == 2  # both clusters trained in the one batch
    finally:
        drv.close()


def test_groups_keep_order_size_and_settings(repo):
    drv = FLDriver(load_config(repo / "configs" / "tiny.yaml", ["data.num_clients=4", "threads=1"]))
    try:
        works = _works(drv, range(4))
        assert groups(works, 3, [3, 3, 3, 3]) == [[0, 1, 2], [3]]
        assert groups(works, 4, [3, 3, 2, 2]) == [[0, 1], [2, 3]]  # different step counts (local_epochs) apart
        other = works[:2] + [w.__class__(**{**w.__dict__, "prox_mu": 0.5}) for w in works[2:]]
        assert groups(other, 4, [3] * 4) == [[0, 1], [2, 3]]
    finally:
        drv.close()


def test_batched_run_matches_sequential_run(repo, tmp_path):
    """A whole run: the simulated clock, bytes and energy are identical, losses equal to float tolerance,
    and the saved adapter is the sequential run's."""
    args = ["data.num_clients=4", "fl.fraction=1.0", "threads=1", "eval.generate=0"]
    rows = {}
    for b in (1, 4):
        out = tmp_path / f"b{b}"
        run(load_config(repo / "configs" / "tiny.yaml", [*args, f"runtime.batch_clients={b}"]), out)
        rows[b] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not (out / "adapter" / "edgelam_slot0").exists()
    for r1, r4 in zip(rows[1], rows[4]):
        for key in ("sim_time_s", "bytes_up", "bytes_down", "energy_j", "clients"):
            assert r1[key] == r4[key], key
        for key in ("train_loss", "eval_loss"):
            assert (r1[key] is None and r4[key] is None) or math.isclose(r1[key], r4[key], rel_tol=1e-5), key


def test_refused_where_clients_cannot_share_a_backward(repo):
    with pytest.raises(ConfigError, match="runtime.batch_clients"):
        load_config(repo / "configs" / "tiny_multitask_sensing.yaml", ["runtime.batch_clients=2"])
    with pytest.raises(ConfigError, match="runtime"):
        load_config(repo / "configs" / "tiny_split.yaml", ["runtime.batch_clients=2"])


def test_trained_modules_are_routed_per_client(repo):
    """A classification head (PEFT modules_to_save) is one copy per client slot, each run on its own
    rows. The encoder's own dropout (BERT's 0.1) draws one mask for the batch, so it is switched off
    here to compare exactly."""
    drv = FLDriver(load_config(repo / "configs" / "tiny_fl_classification.yaml", ["threads=1"]))
    try:
        for mod in drv.ctx.model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        works = _works(drv, range(3))
        seq = LocalExecutor(drv.ctx).run(works)
        bat = BatchedExecutor(drv.ctx, 3).run(works)
        head = [k for k in seq[0].update.state if "classifier" in k]
        assert head
        for s, b in zip(seq, bat):
            assert _close(s.update.state, b.update.state, atol=1e-6)
            assert any(not torch.equal(s.update.state[k], s.start[k]) for k in head)
    finally:
        drv.close()


def test_buckets_bound_the_padding_and_keep_every_client_once():
    from edgelam.fl.batched import buckets

    shapes = [(2, 10), (2, 100), (2, 11), (2, 95), (1, 12), (4, 60)]
    got = buckets(shapes)
    assert got == [[0, 2], [4], [5], [3, 1]]  # (1, 12) would pad [0, 2] past 10 %
    assert sorted(k for b in got for k in b) == list(range(len(shapes)))
    for b in got:
        padded = max(shapes[k][1] for k in b) * sum(shapes[k][0] for k in b)
        assert padded <= 1.1 * sum(n * length for n, length in (shapes[k] for k in b))
    assert buckets([(1, 64)] * 4) == [[0, 1, 2, 3]]  # equal lengths: one forward
