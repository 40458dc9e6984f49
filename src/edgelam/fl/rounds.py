"""A client's trip (dispatch, real training, priced transfers) and a synchronous round of them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import simpy

from edgelam.config import NetConfig, TrainConfig
from edgelam.fl.aggregate import Reduce, fill_unsent
from edgelam.fl.client import ClientUpdate
from edgelam.fl.context import Context
from edgelam.fl.executor import ClientWork, LocalExecutor, plan_trip
from edgelam.fl.transforms import Trip, apply_chain, delta_norm, to_server
from edgelam.fl import faults
from edgelam.fl.faults import Fault
from edgelam.fl.signing import MAC_BYTES
from edgelam.fl.validate import bound, rejection
from edgelam.rundir import RunState
from edgelam.fl.strategies.base import State
from edgelam.models.lora import serialize
from edgelam.fl.secure import SecureOutcome, secure_round
from edgelam.privacy.mechanism import load_ledger, save_ledger
from edgelam.net.topology import ClientCost, LinkState, client_round_cost, draw_links
from edgelam.store import Purpose, rng_for, torch_seed_for


@dataclass(frozen=True)
class Job:
    """One client's trip: what it read, what it sent back, what it cost, when it arrives."""

    client: int
    version: int  # the round / server version it read
    start: State  # the adapter it started from
    update: ClientUpdate
    cost: ClientCost
    arrival_s: float
    rejected: str = ""  # why the server's gate refused the update (fl/validate.py); "" = accepted
    delta_norm: float = 0.0  # L2 norm of the received delta (before fl.norm_bound): what to set a bound from
    fault: Fault = Fault()  # injected (faults): a drop-out mid-trip (its cost cut where it stopped), a straggler

    @property
    def lost(self) -> bool:
        """Dropped out mid-trip (faults.drop): charged what it spent, its update never arrives."""
        return self.fault.phase is not None

    @property
    def accepted(self) -> bool:
        """Arrived and passed the server's gate: what a strategy may aggregate."""
        return not self.rejected and not self.lost


def make_work(ctx: Context, state: State, version: int, k: int, seed: int, train: TrainConfig | None = None) -> ClientWork:
    """The server's side of a trip: what client ``k`` reads and trains, as plain data."""
    strategy = ctx.strategy
    name, start, payload = strategy.dispatch(k, state, version)
    return ClientWork(k, version, name, start, payload, strategy.candidates(k, state, version), strategy.base_delta(state),
                      seed, train or ctx.cfg.train, strategy.prox_mu, ctx.privacy.dpsgd() if ctx.privacy is not None else None)


def uplink(ctx: Context, state: State, k: int, version: int, trained: State, start: State, seed: int = 0) -> State:
    """What crosses the air: the ``fl.uplink`` transforms in order, then the strategy's upload."""
    return ctx.strategy.upload(k, state, apply_chain(ctx.chain, trained, start, Trip(k, version, seed)))


def start_jobs(ctx: Context, state: State, version: int, ks: Sequence[int], links: dict[int, LinkState],
               seeds: dict[int, int], now: float, train: TrainConfig | None = None, net: NetConfig | None = None) -> list[Job]:
    """Client trips: planned from shapes, trained by the executor (all works at once, so a pool can
    run them in parallel), each checked against its plan, then priced on the client's link.
    Training runs in zero simulated time. The planned upload is an upper bound: a strategy whose
    upload depends on the trained values (HetLoRA's rank self-pruning) may send less, and the
    trip is priced with what it sent."""
    works = [make_work(ctx, state, version, k, seeds[k], train) for k in ks]
    plans, planned = [], []
    for w in works:
        shape = w.candidates[min(w.candidates)] if w.candidates else w.start
        planned.append(uplink(ctx, state, w.client, version, shape, shape))
        plans.append(plan_trip(ctx, w, planned[-1]))
    results = (ctx.executor or LocalExecutor(ctx)).run(works)
    jobs = []
    for w, plan, shape, res in zip(works, plans, planned, results):
        k = w.client
        sent = uplink(ctx, state, k, version, res.update.state, res.start, w.seed)
        blob, refused, signed = serialize(sent), "", 0
        if ctx.link is not None:  # fl/signing.py: the client signs, the link may tamper, the server verifies
            arrived, mac = ctx.link.carry(k, version, w.seed, blob)
            decoded, refused = ctx.link.receive(k, version, w.seed, arrived, mac)
            sent, signed = (sent if refused else decoded), MAC_BYTES if mac is not None else 0
        # the server's gate (fl/validate.py): what was planned, less what the task said this client keeps
        rejected = refused or rejection(sent, {n: v for n, v in shape.items() if n not in res.update.unsent}) or ""
        got = (len(blob), res.update.flops + res.probe_flops)
        if not rejected and (got[0] > plan.bytes_up or not math.isclose(got[1], plan.flops, rel_tol=1e-9)):
            raise RuntimeError(f"client {k}: the trip sent {got[0]} bytes / {got[1]:.4g} FLOPs but was planned at "
                               f"{plan.bytes_up} / {plan.flops:.4g}; a planning bug, please report it")
        cost = client_round_cost(net or ctx.cfg.net, ctx.topology.devices[k], links[k], plan.bytes_down, got[0] + signed,
                                 plan.flops)
        fault = faults.draw(ctx.cfg.faults, ctx.cfg.seed, w.seed)
        cost = faults.apply(cost, fault, ctx.cfg.faults.slowdown)
        # the server sees only what crossed; what the client did not train (``unsent``) it keeps at the start
        # value here, and a synchronous round's reduce takes from the clients that sent it (fill_unsent)
        received = to_server(sent, res.start)
        got_state = res.start if rejected else bound(received, res.start, ctx.cfg.fl.norm_bound)
        upd = dataclasses.replace(res.update, state=got_state | {k: res.start[k] for k in res.update.unsent})
        norm = 0.0 if rejected else delta_norm(received, res.start)
        jobs.append(Job(k, version, res.start, upd, cost, now + cost.total_s, rejected, norm, fault))
    return jobs


def filled(updates: Sequence[Any], reduce: Reduce) -> list[Any]:
    """A cohort's updates (``ClientUpdate``, ``EdgeUpdate``) with each key some of them did not send
    (``unsent``) set to ``reduce`` over those that did (``fl.aggregate.fill_unsent``), among the
    updates that started from the same adapter (a cluster's members): a multi-task model's head is
    averaged over the clients holding its task only, an edge weighing in with the samples of its
    devices that sent the key (``EdgeUpdate.key_samples``). A key no one in the group sent keeps the
    value the group started from. The updates themselves when every client sent everything."""
    if not any(u.unsent for u in updates):
        return list(updates)
    out = list(updates)
    for name in {u.adapter for u in updates}:
        idx = [i for i, u in enumerate(updates) if u.adapter == name]
        group = [updates[i] for i in idx]
        states = fill_unsent([u.state for u in group], [u.num_samples for u in group], [u.unsent for u in group],
                             reduce, [getattr(u, "key_samples", {}) for u in group])
        for i, st in zip(idx, states):
            out[i] = dataclasses.replace(updates[i], state=st)
    return out


def select_clients(ctx: Context, round_idx: int) -> list[int]:
    """A synchronous round's cohort: the strategy's selection (Poisson sampling under client-level
    DP, ``privacy/mechanism.py``) without the clients ``privacy.unlearn.exclude`` leaves out (the
    draw itself unchanged, so a run without client K is the same run minus K's trips)."""
    n, rng = len(ctx.data.clients), rng_for(ctx.cfg.seed, Purpose.SELECT, round_idx)
    chosen = ctx.privacy.select(n, rng) if ctx.privacy is not None else None
    if chosen is None:
        chosen = ctx.strategy.select(round_idx, n, rng)
    return [k for k in chosen if k not in ctx.cfg.privacy.unlearn.exclude]


def population_by_adapter(ctx: Context, state: State) -> dict[str, int]:
    """How many (not excluded) clients each adapter serves now: DP-FedAvg's N per adapter."""
    counts: dict[str, int] = {}
    for k, name in enumerate(ctx.strategy.assignment(state, len(ctx.data.clients))):
        if k not in ctx.cfg.privacy.unlearn.exclude:
            counts[name] = counts.get(name, 0) + 1
    return counts


def aggregate_input(ctx: Context, st: RunState, res: RoundResult, round_idx: int) -> list[Any]:
    """What a synchronous round's strategy aggregates: the arrived updates (``filled``), the unmasked
    sum under secure aggregation, or under central DP the noised release per adapter, with the
    privacy spent recorded in the run state's ledger (``privacy/mechanism.py``)."""
    updates = filled([j.update for j in res.jobs], ctx.strategy.reduce) if res.released is None else res.released
    if ctx.privacy is None:
        return updates
    ledger = load_ledger(st.aux_meta)
    if res.released is not None:  # SecAgg: DP noise came from the clients; a failed round released nothing
        ctx.privacy.record_secure(ledger, res.jobs, [r.adapter for r in res.released])
        out = res.released
    else:
        out = ctx.privacy.release(ledger, res.jobs, updates, population_by_adapter(ctx, st.state),
                                  ctx.strategy.adapters(st.state), round_idx)
    save_ledger(st.aux_meta, ledger)
    return out


def privacy_row(ctx: Context, st: RunState) -> dict[str, Any]:
    """The metrics line's privacy fields: ``dp_epsilon`` and the ``privacy`` block (none without DP)."""
    if ctx.privacy is None:
        return {}
    report = ctx.privacy.report(load_ledger(st.aux_meta))
    return {"dp_epsilon": report["epsilon"], "privacy": report}


def start_job(ctx: Context, state: State, version: int, k: int, link: LinkState, seed: int, now: float,
              train: TrainConfig | None = None, net: NetConfig | None = None) -> Job:
    return start_jobs(ctx, state, version, [k], {k: link}, {k: seed}, now, train, net)[0]


@dataclass(frozen=True)
class RoundResult:
    jobs: list[Job]  # arrived in time, in client order
    dropped: list[Job]  # missed the deadline (or went silent in SecAgg): work charged, update discarded
    end_time_s: float
    released: list[Any] | None = None  # secure aggregation: the unmasked aggregate per adapter ([]: failed)
    secagg: dict[str, Any] | None = None  # the metrics line's ``secagg`` block
    rejected: list[Job] = dataclasses.field(default_factory=list)  # arrived, refused by the gate (charged)
    lost: list[Job] = dataclasses.field(default_factory=list)  # dropped out mid-trip (faults.drop; charged their part)


def secure_cohort(ctx: Context, st: RunState, jobs: Sequence[Job], links: dict[int, LinkState], round_idx: int,
                  edge: int = 0, population: dict[str, int] | None = None) -> list[SecureOutcome]:
    """SecAgg within each adapter's cohort (``fl/secure.py``)."""
    pop = population or population_by_adapter(ctx, st.state)
    return [secure_round(ctx, [j for j in jobs if j.update.adapter == name], links, round_idx, edge, pop[name])
            for name in sorted({j.update.adapter for j in jobs})]


def merge_reports(outcomes: Sequence[SecureOutcome]) -> dict[str, Any]:
    reports = [o.report for o in outcomes]
    if len(reports) == 1:
        return reports[0]
    return {"cohorts": reports, "failed": sum("failed" in r for r in reports)}


def run_round(env: simpy.Environment, ctx: Context, st: RunState, selected: list[int], round_idx: int) -> RoundResult:
    """Dispatch, train and collect the selected clients on the simulated clock (barrier or deadline)."""
    cfg = ctx.cfg
    links = draw_links(cfg.net, ctx.topology, selected, rng_for(cfg.seed, Purpose.FADING, round_idx))
    arrived: dict[int, Job] = {}
    for transform in ctx.chain:
        transform.on_cohort(selected, round_idx)
    seeds = {k: torch_seed_for(cfg.seed, Purpose.TRAIN, round_idx, k) for k in selected}
    jobs = {j.client: j for j in start_jobs(ctx, st.state, round_idx, selected, links, seeds, env.now)}
    secure = secure_cohort(ctx, st, list(jobs.values()), links, round_idx) if cfg.privacy.secagg.enabled and jobs else []
    silent = {j.client for o in secure for j in o.dropped}
    jobs |= {j.client: j for o in secure for j in [*o.jobs, *o.dropped]}
    setup_s = max((o.setup_s for o in secure), default=0.0)

    def client(job: Job):  # type: ignore[no-untyped-def]
        yield env.timeout(setup_s)  # SecAgg's key rounds come before the model goes down
        yield env.timeout(job.cost.t_down_s)
        yield env.timeout(job.cost.t_comp_s)
        if job.client in silent:
            return
        yield env.timeout(job.cost.t_up_s)
        if not job.lost:  # a lost trip's costs stop where it dropped out; the server learns it then
            arrived[job.client] = job

    everyone = env.all_of([env.process(client(jobs[k])) for k in selected])
    if cfg.fl.deadline_s is None:
        env.run(until=everyone)
    else:
        env.run(until=env.any_of([everyone, env.timeout(cfg.fl.deadline_s)]))
    unmask_s = max((o.unmask_s for o in secure), default=0.0)
    if unmask_s > 0:  # the Unmasking round, after the last masked update
        env.run(until=env.now + unmask_s)
    done = [jobs[k] for k in selected if k in arrived and not jobs[k].rejected]
    released = [r for o in secure for r in o.released] if secure else None
    return RoundResult(done, [jobs[k] for k in selected if k not in arrived and not jobs[k].lost], float(env.now), released,
                       merge_reports(secure) if secure else None, [jobs[k] for k in selected if k in arrived and jobs[k].rejected],
                       [jobs[k] for k in selected if jobs[k].lost])


def trained_loss(ups: Sequence[ClientUpdate]) -> float | None:
    """The sample-weighted mean of the clients' own training losses (None without clients)."""
    n = sum(u.num_samples for u in ups)
    return sum(u.train_loss * u.num_samples for u in ups) / n if n else None


def metrics_row(st: RunState, round_idx: int, jobs: Sequence[Job], end_time_s: float, wall_s: float,
                dropped: Sequence[Job] = (), staleness: Sequence[int] | None = None,
                backhaul: tuple[int, int] = (0, 0), rejected: Sequence[Job] = (), lost: Sequence[Job] = ()) -> dict[str, Any]:
    """One metrics line. Clients dropped at a deadline are charged their download and compute, not
    an upload; clients lost mid-trip (faults.drop) what they spent before the drop (their cost is
    cut there). ``backhaul`` is (bytes up, bytes down) over the wired edge-cloud links this round."""
    stale = list(staleness) if staleness is not None else [0] * len(jobs)
    ups = [j.update for j in jobs]
    spent = [*jobs, *rejected, *lost]
    step = {
        "bytes_up": sum(j.cost.bytes_up for j in spent),
        "bytes_down": sum(j.cost.bytes_down for j in [*spent, *dropped]),
        "bytes_backhaul_up": backhaul[0], "bytes_backhaul_down": backhaul[1],
        "energy_j": sum(j.cost.e_tx_j + j.cost.e_comp_j for j in spent) + sum(j.cost.e_comp_j for j in dropped),
    }
    faults = {"faults": [j.fault.report(j.client) for j in lost]} if lost else {}
    slow = sorted(j.client for j in [*spent, *dropped] if j.fault.straggled)
    st.totals = {k: st.totals.get(k, 0) + v for k, v in step.items()}
    return {
        "round": round_idx, "sim_time_s": end_time_s, "round_time_s": end_time_s - st.sim_time_s,
        # every arrived client's own training loss, rejected ones too: a client whose training diverged
        # (NaN update) stops the run as diverged (rundir.check_finite) instead of vanishing at the gate
        "train_loss": trained_loss([j.update for j in [*jobs, *rejected]]),
        **step, **{f"{k}_total": v for k, v in st.totals.items()},
        "clients": [u.client for u in ups], "dropped": [j.client for j in dropped],
        **({"rejected": [{"client": j.client, "reason": j.rejected} for j in rejected]} if rejected else {}),
        **faults, **({"stragglers": slow} if slow else {}),
        "client_stats": [{
            "client": j.client, "adapter": j.update.adapter, "samples": j.update.num_samples,
            "train_loss": j.update.train_loss, "steps": j.update.steps, "tokens": j.update.tokens, "flops": j.update.flops,
            "t_down_s": j.cost.t_down_s, "t_comp_s": j.cost.t_comp_s, "t_up_s": j.cost.t_up_s,
            "energy_tx_j": j.cost.e_tx_j, "energy_comp_j": j.cost.e_comp_j, "bytes_up": j.cost.bytes_up,
            "staleness": tau, "delta_norm": j.delta_norm,
        } for j, tau in zip(jobs, stale)],
        "wall_s": wall_s,
    }
