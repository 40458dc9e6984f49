"""Secure aggregation in a round (``privacy.secagg``): the cohort runs SecAgg (``privacy/secagg.py``,
Bonawitz et al. 2017) and the aggregator learns only the sum of what the clients sent.

What is summed, per client k, as one flat vector (sorted adapter keys):
- without central DP: the FedAvg numerator and denominator, ``[n_k delta_k / S, clip n_k / S]``
  with S the largest client's example count (public), so the server gets the sample-weighted mean
  of the deltas; each coordinate must lie in [-clip, clip] (``privacy.secagg.clip``): values beyond
  are clipped by the quantiser, and the share of such coordinates is reported (``saturated``);
- with central DP (``privacy.dp.mode: central``): ``delta_k + z_k``, z_k ~ N(0, (sigma C)^2 / t),
  noise added before masking (distributed DP). t is the threshold, the fewest clients a round can
  be unmasked with, so the unmasked sum always carries at least N(0, (sigma C)^2) and the
  accountant's sigma holds; the server divides by DP-FedAvg's fixed q N.

On the clock: AdvertiseKeys and ShareKeys before training (each a barrier: the server waits for
every client's message, then broadcasts), the masked update instead of the plain one, and the
Unmasking round after the last masked update arrives. Every message is priced on the client's
link from its real length. Clients that go silent after ShareKeys (``privacy.secagg.dropout``)
are left out of the sum with their pairwise masks removed; if fewer than t clients remain, the
round fails cleanly: the model is unchanged and the work is charged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgelam.fl.context import Context
from edgelam.net import channel
from edgelam.net.topology import LinkState
from edgelam.privacy.dp import gaussian_noise
from edgelam.privacy.mechanism import Released
from edgelam.privacy.secagg import SecAggError, SecAggParams, SecAggResult, secure_sum
from edgelam.store import Purpose, rng_for, torch_seed_for

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SecureOutcome:
    jobs: list[Any]  # the clients whose masked update is in the sum, SecAgg's traffic priced in
    dropped: list[Any]  # went silent after ShareKeys: download and compute charged, nothing sent
    released: list[Released]  # the aggregate (one per adapter), empty when the round failed
    setup_s: float  # AdvertiseKeys + ShareKeys, before the model goes down
    unmask_s: float  # the Unmasking round, after the last masked update
    report: dict[str, Any]  # the metrics line's ``secagg`` block


def threshold(ctx: Context, cohort: int) -> int:
    """t: ``privacy.secagg.threshold``, or floor(2 m / 3) + 1 of the cohort m (a majority that
    survives a third of the cohort dropping out)."""
    t = ctx.cfg.privacy.secagg.threshold
    return t if t is not None else 2 * cohort // 3 + 1


def _flat(state: State, start: State) -> np.ndarray:
    return torch.cat([(state[k].double() - start[k].double()).reshape(-1) for k in sorted(start)]).numpy()


def _unflat(vector: np.ndarray, like: State) -> State:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = torch.from_numpy(vector[i: i + n].copy()).reshape(like[k].shape)
        i += n
    return out


def _vectors(ctx: Context, jobs: Sequence[Any], t: int, round_idx: int, edge: int) -> dict[int, np.ndarray]:
    sa, dp = ctx.cfg.privacy.secagg, ctx.privacy.dp if ctx.privacy is not None else None
    scale = max(len(c.train) for c in ctx.data.clients)  # S: public
    out = {}
    for j in jobs:
        delta = _flat(j.update.state, j.start)
        if dp is not None and dp.mode == "central":
            seed = torch_seed_for(ctx.cfg.seed, Purpose.DP_NOISE, round_idx, 3, edge, j.client)
            z = gaussian_noise({"z": torch.zeros(delta.shape)}, dp.sigma * dp.clip / np.sqrt(t), seed)["z"].numpy()
            out[j.client] = delta + z
        else:
            n = j.update.num_samples / scale
            out[j.client] = np.concatenate([n * delta, [sa.clip * n]])
    return out


def _phase_s(parts: Sequence[tuple[int, float]]) -> float:
    """A barrier round: the slowest client's transfer (bytes, rate)."""
    return max((channel.transfer_time_s(b, r) for b, r in parts), default=0.0)


def secure_round(ctx: Context, jobs: Sequence[Any], links: dict[int, LinkState], round_idx: int, edge: int = 0,
                 population: int | None = None) -> SecureOutcome:
    """SecAgg over ``jobs`` (one adapter's cohort); ``population``: DP-FedAvg's N for the fixed
    denominator under central DP (the clients the adapter serves)."""
    sa = ctx.cfg.privacy.secagg
    cohort = sorted(jobs, key=lambda j: j.client)
    t = threshold(ctx, len(cohort))
    rng = rng_for(ctx.cfg.seed, Purpose.SECAGG, round_idx, edge)
    silent = {j.client for j in cohort if rng.random() < sa.dropout}
    report: dict[str, Any] = {"cohort": len(cohort), "threshold": t, "dropped": sorted(silent)}
    vectors = _vectors(ctx, cohort, t, round_idx, edge)
    saturated = sum(int((np.abs(v) > sa.clip).sum()) for v in vectors.values())
    report["saturated"] = saturated / max(1, sum(v.size for v in vectors.values()))
    try:
        if len(cohort) < t:
            raise SecAggError(f"the cohort has {len(cohort)} clients, below the threshold t={t}")
        res: SecAggResult | None = secure_sum(vectors, SecAggParams(t, sa.bits, sa.clip),
                                              torch_seed_for(ctx.cfg.seed, Purpose.SECAGG, round_idx, edge), silent)
    except SecAggError as exc:
        res = None
        report["failed"] = str(exc)
    released = _release(ctx, cohort, silent, res, population) if res is not None else []
    power = {j.client: ctx.topology.devices[j.client].tx_power_w for j in cohort}
    return _priced(cohort, silent, links, power, res, released, report)


def _release(ctx: Context, cohort: Sequence[Any], silent: set[int], res: SecAggResult,
             population: int | None) -> list[Released]:
    start = cohort[0].start
    dp = ctx.privacy.dp if ctx.privacy is not None else None
    if dp is not None and dp.mode == "central":
        mean = res.total / (dp.q * (population or len(cohort)))
    else:
        weight = res.total[-1] / ctx.cfg.privacy.secagg.clip
        mean = res.total[:-1] / weight if weight > 0 else np.zeros(res.total.size - 1)
    delta = _unflat(mean, start)
    state = {k: (start[k].double() + delta[k]).to(start[k].dtype) for k in start}
    return [Released(state, cohort[0].update.adapter)]


def _priced(cohort: Sequence[Any], silent: set[int], links: dict[int, LinkState], power_w: dict[int, float],
            res: SecAggResult | None, released: list[Released], report: dict[str, Any]) -> SecureOutcome:
    """Jobs with SecAgg's bytes, time and energy: the masked update replaces the plain one."""
    if res is None:  # failed before or during the protocol: nothing was unmasked; price the plain trips
        return SecureOutcome(list(cohort), [], [], 0.0, 0.0, report)
    tr = res.traffic
    up = {j.client: links[j.client].up_bps for j in cohort}
    down = {j.client: links[j.client].down_bps for j in cohort}
    setup = (_phase_s([(tr[k].up["advertise"], up[k]) for k in tr]) + _phase_s([(tr[k].down["advertise"], down[k]) for k in tr])
             + _phase_s([(tr[k].up["share"], up[k]) for k in tr]) + _phase_s([(tr[k].down["share"], down[k]) for k in tr]))
    senders = [k for k in tr if k not in silent]
    unmask = (_phase_s([(tr[k].down["unmask"], down[k]) for k in senders])
              + _phase_s([(tr[k].up["unmask"], up[k]) for k in senders]))
    jobs: list[Any] = []
    dropped: list[Any] = []
    for j in cohort:
        k, c = j.client, j.cost
        sent = tr[k].up["advertise"] + tr[k].up["share"] + (tr[k].up["masked"] + tr[k].up["unmask"] if k not in silent else 0)
        got = c.bytes_down + sum(tr[k].down.values())
        t_up = channel.transfer_time_s(tr[k].up["masked"], up[k]) if k not in silent else 0.0
        cost = dataclasses.replace(c, t_up_s=t_up, bytes_up=sent, bytes_down=got,
                                   e_tx_j=channel.tx_energy_j(power_w[k], channel.transfer_time_s(sent, up[k])))
        job = dataclasses.replace(j, cost=cost)
        (dropped if k in silent else jobs).append(job)
    report |= {"survivors": len(senders), "extra_bytes_up": sum(tr[k].extra_up for k in tr),
               "extra_bytes_down": sum(tr[k].extra_down for k in tr), "setup_s": setup, "unmask_s": unmask,
               "client_cpu_s": float(np.median(list(res.cpu_s.values()))), "server_cpu_s": res.server_cpu_s}
    return SecureOutcome(jobs, dropped, released, setup, unmask, report)
