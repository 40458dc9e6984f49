"""The executor seam: a client trip is plain data, its cost is planned from shapes before training
and equals what training did, and works do not leak state into each other (so a pool of workers
could run them in any order)."""

from __future__ import annotations

import torch

from edgelam.config_load import load_config
from edgelam.fl.driver import FLDriver
from edgelam.fl.executor import planned_train_flops, plan_trip
from edgelam.fl.rounds import make_work, uplink
from edgelam.models.lora import serialize
from edgelam.store import Purpose, torch_seed_for


def _driver(repo, strategy: str, *extra: str) -> FLDriver:
    cfg = load_config(repo / "configs" / "tiny_hetero_rank.yaml", [f"fl.strategy={strategy}", *extra])
    return FLDriver(cfg)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_matches_training_and_works_are_independent(repo):
    drv = _driver(repo, "flora")  # FLoRA: ranks differ per client and the base delta travels with the work
    try:
        ctx, st = drv.ctx, drv.initial_state()
        # a state after one aggregation, so the base delta is not zero
        works = [make_work(ctx, st.state, 1, k, torch_seed_for(0, Purpose.TRAIN, 1, k)) for k in (0, 5)]
        first = drv.ctx.executor.run(works)
        st.state = ctx.strategy.aggregate(st.state, [r.update for r in first], 1)
        works = [make_work(ctx, st.state, 2, k, torch_seed_for(0, Purpose.TRAIN, 2, k)) for k in (0, 5, 0)]
        assert any(v.abs().sum() > 0 for v in works[0].base_delta.values())
        a, b, a_again = ctx.executor.run(works)
        assert _equal(a.update.state, a_again.update.state)  # the same work gives the same update after another
        for w, res in zip(works, (a, b)):
            plan = plan_trip(ctx, w, uplink(ctx, st.state, w.client, 2, w.start, w.start))
            sent = uplink(ctx, st.state, w.client, 2, res.update.state, res.start)
            assert plan.bytes_up == len(serialize(sent)) and plan.flops == res.update.flops
            assert plan.bytes_down == len(serialize(w.payload))
        ranks = [int(st.state["rank"][k]) for k in (0, 5)]
        assert ranks[0] != ranks[1]  # the two clients send different shapes
    finally:
        drv.close()


def test_ifca_probes_on_the_client_side_and_is_charged(repo):
    cfg = load_config(repo / "configs" / "tiny_clustered.yaml")
    drv = FLDriver(cfg)
    try:
        ctx, st = drv.ctx, drv.initial_state()
        assert ctx.strategy.candidates(0, st.state, 1) is None  # warm-up: no choice
        offered = ctx.strategy.candidates(0, st.state, 2)
        assert offered is not None and sorted(offered) == ["c0", "c1"]
        work = make_work(ctx, st.state, 2, 0, 123)
        res = ctx.executor.run([work])[0]
        plan = plan_trip(ctx, work, uplink(ctx, st.state, 0, 2, work.start, work.start))
        assert res.probe_flops > 0 and plan.flops == res.update.flops + res.probe_flops
        assert plan.bytes_down == sum(len(serialize(a)) for a in offered.values())  # every cluster downloaded
    finally:
        drv.close()


def test_planned_flops_follow_the_seeded_batches(repo):
    drv = _driver(repo, "fedavg", "model.lora.r=8", "fl.rank.ranks=[8]")
    try:
        ctx = drv.ctx
        data = ctx.data.clients[1].train
        one = planned_train_flops(data, ctx.cfg.train, 7, ctx.flops, ctx.task)
        assert one == planned_train_flops(data, ctx.cfg.train, 7, ctx.flops, ctx.task) > 0
        res = ctx.executor.run([make_work(ctx, drv.initial_state().state, 1, 1, 7)])[0]
        assert res.update.flops == one
    finally:
        drv.close()


def test_an_upload_that_depends_on_training_is_priced_on_what_was_sent(repo):
    # HetLoRA's self-pruning decides the rank from the trained values: the plan (from shapes) is an
    # upper bound, and the trip is priced with the bytes that were sent, never above the plan
    import dataclasses

    from edgelam.fl.hetero import truncate
    from edgelam.fl.rounds import start_jobs
    from edgelam.fl.strategies.fedavg import FedAvg
    from edgelam.net.topology import draw_links

    @dataclasses.dataclass(frozen=True)
    class HalvesWhenTrained(FedAvg):
        def upload(self, client, state, adapter):
            trained = any(not torch.equal(v, state["global." + k]) for k, v in adapter.items())
            return truncate(adapter, 4) if trained else adapter

    drv = _driver(repo, "fedavg", "fl.rank.ranks=[8]")
    try:
        ctx, st = drv.ctx, drv.initial_state()
        ctx.strategy = HalvesWhenTrained()
        links = draw_links(ctx.cfg.net, ctx.topology, [0], __import__("numpy").random.default_rng(0))
        job = start_jobs(ctx, st.state, 1, [0], links, {0: 3}, 0.0)[0]
        full = len(serialize({k[len("global."):]: v for k, v in st.state.items()}))
        assert job.cost.bytes_up == len(serialize(job.update.state)) < full
    finally:
        drv.close()
