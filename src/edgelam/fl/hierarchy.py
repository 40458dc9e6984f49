"""A hierarchical round on the clock: edge servers run kappa2 edge rounds in parallel, then the cloud.

Per edge: the cloud model comes down the backhaul (latency + bytes / rate); kappa2 times, its
selected devices train kappa1 local steps in parallel over their wireless links to the edge, and
the edge averages; the edge model goes up the backhaul. The round ends when the last edge's model
reaches the cloud, which averages the edge models weighted by their samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import simpy

from edgelam.fl.context import Context
from edgelam.rundir import RunState
from edgelam.fl.rounds import Job, filled, start_jobs
from edgelam.fl.secure import secure_round
from edgelam.fl.strategies.base import GLOBAL, State, get_prefixed, put_prefixed
from edgelam.models.lora import serialize
from edgelam.net import channel
from edgelam.net.topology import draw_links
from edgelam.store import Purpose, rng_for, torch_seed_for


@dataclass(frozen=True)
class EdgeUpdate:
    """An edge model as the cloud sees it (a weighted-average input)."""

    client: int  # the edge server's index
    state: State
    num_samples: int
    adapter: str = GLOBAL
    key_samples: dict[str, int] = field(default_factory=dict)  # keys some devices did not send: the senders' samples

    @property
    def unsent(self) -> frozenset[str]:
        """Keys none of its devices trained (a task none of them holds)."""
        return frozenset(k for k, n in self.key_samples.items() if n == 0)


@dataclass(frozen=True)
class HierResult:
    jobs: list[Job]  # every device trip of every edge round
    edge_updates: list[EdgeUpdate]
    backhaul: tuple[int, int]  # bytes edge -> cloud, cloud -> edge
    end_time_s: float
    secagg: dict[str, Any] | None = None  # SecAgg at each edge: the reports of every edge round


def run_hier_round(env: simpy.Environment, ctx: Context, st: RunState, selected: list[int], round_idx: int) -> HierResult:
    strategy = ctx.strategy
    cfg = ctx.cfg
    train = dataclasses.replace(cfg.train, local_steps=cfg.fl.hier.kappa1, local_epochs=None)
    device_net = dataclasses.replace(cfg.net, server_tier="edge")  # device legs end at the edge server
    members: dict[int, list[int]] = {}
    for k in selected:
        members.setdefault(ctx.topology.devices[k].edge, []).append(k)
    jobs: list[Job] = []
    edge_updates: dict[int, EdgeUpdate] = {}
    backhaul = [0, 0]
    dp = ctx.privacy.dp if ctx.privacy is not None else None
    secure = cfg.privacy.secagg.enabled
    reports: list[dict] = []  # SecAgg's report per edge round
    edge_noise = dp is not None and dp.mode == "central" and dp.noise_at == "edge" and not secure
    attached: dict[int, int] = {}  # devices (not excluded) each edge serves: DP-FedAvg's N at the edge
    for k, dev in enumerate(ctx.topology.devices):
        if k not in cfg.privacy.unlearn.exclude:
            attached[dev.edge] = attached.get(dev.edge, 0) + 1

    def backhaul_s(n_bytes: int) -> float:
        return cfg.net.backhaul_latency_s + channel.transfer_time_s(n_bytes, cfg.net.backhaul_bps)

    def edge(e: int, devices: list[int]):  # type: ignore[no-untyped-def]
        model = get_prefixed(st.state, GLOBAL)
        size = len(serialize(model))
        backhaul[1] += size
        yield env.timeout(backhaul_s(size))
        for t in range(cfg.fl.hier.kappa2):
            links = draw_links(cfg.net, ctx.topology, devices, rng_for(cfg.seed, Purpose.EDGE_FADING, round_idx, e, t))
            seeds = {k: torch_seed_for(cfg.seed, Purpose.TRAIN, round_idx, k, t) for k in devices}
            trips = start_jobs(ctx, put_prefixed(GLOBAL, model), round_idx, devices, links, seeds, env.now, train, device_net)
            # refused by the edge's gate, or lost mid-trip (faults.drop): charged, not averaged
            refused = [j for j in trips if not j.accepted]
            jobs.extend(refused)
            trips = [j for j in trips if j.accepted]
            if not trips:
                yield env.timeout(max(j.cost.total_s for j in refused))
                continue
            if secure:  # SecAgg at the edge: the edge server learns only its devices' sum
                outcome = secure_round(ctx, trips, links, round_idx, edge=1000 * (1 + t) + e, population=attached[e])
                jobs.extend([*outcome.jobs, *outcome.dropped])
                reports.append(outcome.report)
                sent = max((j.cost.total_s for j in outcome.jobs), default=0.0)
                silent = [j.cost.t_down_s + j.cost.t_comp_s for j in outcome.dropped]
                yield env.timeout(outcome.setup_s + max([sent, *silent]) + outcome.unmask_s)
                model = outcome.released[0].state if outcome.released else model  # failed: the edge model stays
                continue
            jobs.extend(trips)
            yield env.timeout(max(j.cost.total_s for j in trips))  # the edge waits for its slowest device
            if edge_noise:  # central DP at the edge: the noised mean of its devices' clipped updates
                model = ctx.privacy.release({}, trips, [], {GLOBAL: attached[e]}, {GLOBAL: model}, round_idx, 1 + t, e,
                                            record=False)[0].state
            else:
                model = strategy.reduce([u.state for u in filled([j.update for j in trips], strategy.reduce)],
                                        [j.update.num_samples for j in trips])
        backhaul[0] += size
        yield env.timeout(backhaul_s(size))
        key_samples = {} if secure else {key: sum(j.update.num_samples for j in trips if key not in j.update.unsent)
                                         for key in frozenset().union(*(j.update.unsent for j in trips))}
        # under DP the cloud weighs an edge by the devices it serves (public), not by who took part
        weight = attached[e] if ctx.privacy is not None else sum(len(ctx.data.clients[k].train) for k in devices)
        edge_updates[e] = EdgeUpdate(e, model, weight, key_samples=key_samples)

    env.run(until=env.all_of([env.process(edge(e, ds)) for e, ds in sorted(members.items())]))
    return HierResult(jobs, [edge_updates[e] for e in sorted(edge_updates)], (backhaul[0], backhaul[1]), float(env.now),
                      {"edges": reports, "failed": sum("failed" in r for r in reports)} if secure else None)
