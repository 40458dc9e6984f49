"""Asynchronous schemes on the event clock: no rounds, no barrier.

Every active device loops: read the current global adapter, train (real compute), upload. The
server folds each arrival in with the strategy's ``on_arrival``; every new global version is one
metrics line ("round"), evaluated and checkpointed like a synchronous round. A checkpoint also
holds the jobs in flight (their already computed updates and arrival times), so a resumed run
replays exactly what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import simpy

from edgelam.fl.client import ClientUpdate
from edgelam.fl.context import Context
from edgelam.rundir import RunState
from edgelam.fl.faults import Fault
from edgelam.fl.rounds import Job, metrics_row, privacy_row, start_job
from edgelam.fl.strategies.base import AsyncStrategy, get_prefixed, put_prefixed
from edgelam.net.topology import ClientCost, link_state
from edgelam.privacy.mechanism import load_ledger, save_ledger
from edgelam.store import Purpose, rng_for, torch_seed_for


def _dispatch(ctx: Context, st: RunState, k: int, counts: dict[int, int], share: dict[int, int], now: float) -> Job:
    """Client k's next trip; its fading and training seed depend on (seed, k, trip number) only."""
    n = counts.get(k, 0)
    counts[k] = n + 1
    cfg, dev = ctx.cfg, ctx.topology.devices[k]
    fading = float(rng_for(cfg.seed, Purpose.ASYNC_FADING, k, n).exponential(1.0)) if cfg.net.fading == "rayleigh" else 1.0
    link = link_state(cfg.net, dev, dev.large_scale_gain * fading, share[dev.edge])
    return start_job(ctx, st.state, st.round, k, link, torch_seed_for(cfg.seed, Purpose.ASYNC_TRAIN, k, n), now)


def _pack(jobs: dict[int, Job]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Jobs in flight as checkpoint tensors and JSON facts."""
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for k, j in jobs.items():
        tensors |= put_prefixed(f"{k}.update", j.update.state) | put_prefixed(f"{k}.start", j.start)
        upd = {f.name: getattr(j.update, f.name) for f in dataclasses.fields(j.update) if f.name != "state"}
        upd["unsent"] = sorted(upd["unsent"])  # JSON
        meta[str(k)] = {"version": j.version, "arrival_s": j.arrival_s, "update": upd, "cost": dataclasses.asdict(j.cost),
                        "rejected": j.rejected, "delta_norm": j.delta_norm, "fault": dataclasses.asdict(j.fault)}
    return tensors, meta


def _unpack(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[int, Job]:
    jobs = {}
    for key, m in meta.items():
        k = int(key)
        facts = m["update"] | {"unsent": frozenset(m["update"].get("unsent", ()))}
        upd = ClientUpdate(state=get_prefixed(tensors, f"{k}.update"), **facts)
        jobs[k] = Job(k, m["version"], get_prefixed(tensors, f"{k}.start"), upd, ClientCost(**m["cost"]), m["arrival_s"],
                      m.get("rejected", ""), m.get("delta_norm", 0.0), Fault(**m.get("fault", {})))
    return jobs


def edge_shares(ctx: Context, active: list[int]) -> dict[int, int]:
    """Every active device transmits now and then: each edge server splits its band among its active devices."""
    share: dict[int, int] = {}
    for k in active:
        share[ctx.topology.devices[k].edge] = share.get(ctx.topology.devices[k].edge, 0) + 1
    return share


def run_async(ctx: Context, st: RunState, commit: Callable[[dict[str, Any]], None], wall: Callable[[], float]) -> None:
    """Advance ``st`` until ``fl.rounds`` global versions exist, calling ``commit`` for each."""
    strategy = ctx.strategy
    if not isinstance(strategy, AsyncStrategy):
        raise TypeError(f"{ctx.cfg.fl.strategy} runs on the async driver but has no on_arrival")
    rounds = ctx.cfg.fl.rounds
    active = [k for k in strategy.select(0, len(ctx.data.clients), rng_for(ctx.cfg.seed, Purpose.SELECT, 0))
              if k not in ctx.cfg.privacy.unlearn.exclude]
    privacy = ctx.privacy
    ledger = load_ledger(st.aux_meta)
    share = edge_shares(ctx, active)
    counts = {int(k): int(v) for k, v in st.aux_meta.get("counts", {}).items()}
    in_flight = _unpack(st.aux, st.aux_meta.get("jobs", {}))
    env = simpy.Environment(initial_time=st.sim_time_s)
    inbox = simpy.Store(env)
    pending: list[tuple[Job, int]] = []  # arrivals since the last version, with their staleness
    rejects: list[Job] = []  # arrivals the gate refused since the last version
    lost: list[Job] = []  # trips that dropped out mid-way (faults.drop) since the last version

    def trip(k: int, job: Job | None = None):  # type: ignore[no-untyped-def]
        job = job or _dispatch(ctx, st, k, counts, share, env.now)
        in_flight[k] = job
        yield env.timeout(max(0.0, job.arrival_s - env.now))
        del in_flight[k]
        yield inbox.put(job)

    def new_version() -> None:
        row = metrics_row(st, st.round + 1, [j for j, _ in pending], env.now, wall(), staleness=[s for _, s in pending],
                          rejected=list(rejects), lost=list(lost))
        rejects.clear()
        lost.clear()
        if privacy is not None:
            privacy.record_async(ledger, [(j.client, strategy.dp_weight(s)) for j, s in pending])
        st.round, st.sim_time_s = st.round + 1, float(env.now)
        st.aux, jobs_meta = _pack(in_flight)
        st.aux_meta = {"counts": counts, "jobs": jobs_meta}
        if privacy is not None:
            save_ledger(st.aux_meta, ledger)
        commit(row | privacy_row(ctx, st))
        pending.clear()

    def server():  # type: ignore[no-untyped-def]
        while st.round < rounds:
            job: Job = yield inbox.get()
            if job.lost:  # the connection went mid-trip: charged up to there; the device starts afresh
                lost.append(job)
                env.process(trip(job.client))
                continue
            if job.rejected:  # refused by the server's gate (fl/validate.py): charged, never folded in
                rejects.append(job)
                if len(rejects) > 20 * len(active):  # nothing gets through: stop rather than loop forever
                    raise RuntimeError(f"the server's gate rejected {len(rejects)} updates in a row without a new "
                                       f"version; the last: client {job.client}, {job.rejected}")
                env.process(trip(job.client))
                continue
            staleness = st.round - job.version
            update, start = job.update, job.start
            if update.unsent:  # what the client did not train: no change, against the server's state now
                now = {k: v for k, v in get_prefixed(st.state, update.adapter).items() if k in update.unsent}
                update, start = dataclasses.replace(update, state=update.state | now), start | now
            noise = None
            if privacy is not None:
                privacy.record_uploads(ledger, [job])  # local DP and DP-SGD: the upload itself
                noise = privacy.async_noise(start, st.round, len(pending))
            st.state, changed = strategy.on_arrival(st.state, update, start, staleness, noise)
            pending.append((job, staleness))
            if changed:
                new_version()
            if st.round < rounds:
                env.process(trip(job.client))  # straight back to work with the newest model

    for k in active:
        env.process(trip(k, in_flight.get(k)))
    env.run(until=env.process(server()))
