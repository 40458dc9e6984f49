"""A run's privacy: the settings resolved once (sigma calibrated to a target epsilon for the planned
steps), the uplink transforms it adds, the noised releases the drivers call, and the ledger of
what actually happened, kept in the checkpoint so a resumed run accounts exactly like an
uninterrupted one. The maths is in ``privacy/dp.py`` and ``privacy/accountant.py``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from edgelam.config import RunConfig
from edgelam.config_checks import ConfigError
from edgelam.fl.transforms import Clip, Trip
from edgelam.privacy import accountant as acc
from edgelam.privacy.dp import ClientDP, add_noise, default_delta, edge_sigma, expected_trips, gaussian_noise, noised_mean
from edgelam.privacy.dp import poisson_select
from edgelam.fl.client import num_local_steps
from edgelam.privacy.dpsgd import DPSGD, sample_rate
from edgelam.store import Purpose, torch_seed_for

State = dict[str, Tensor]
ALL = "all"  # the ledger's party for a mechanism every client shares (central DP)
AUX_KEY = "privacy"  # RunState.aux_meta key of the ledger


@dataclass(frozen=True)
class LocalNoise:
    """Local DP: add N(0, (sigma C)^2 I) to the (already clipped) update, seeded by the trip."""

    sigma: float
    clip: float
    seed: int

    def __call__(self, update: State, start: State, trip: Trip) -> State:
        seed = torch_seed_for(self.seed, Purpose.DP_NOISE, 1, trip.client, trip.round, trip.seed % 2**62)
        return add_noise(update, gaussian_noise(update, self.sigma * self.clip, seed))

    def on_cohort(self, clients: Sequence[int], round_idx: int) -> None:
        return None


@dataclass(frozen=True)
class Released:
    """A noised aggregate as the strategy's reduce sees it: one update standing for the cohort."""

    state: State
    adapter: str
    num_samples: int = 1
    client: int = -1
    unsent: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Facts:
    """What calibration needs to know of the clients: expected round latency, examples, the active set."""

    latency_s: Sequence[float]
    sizes: Sequence[int]
    active: Sequence[int]  # the asynchronous driver's active devices (all clients otherwise)


def _plan(cfg: RunConfig, facts: Facts, driver: str, sigma: float) -> dict[acc.Step, int]:
    """The steps the worst-off client is planned to take (for calibrating sigma to a target epsilon)."""
    dp, fl, train = cfg.privacy.dp, cfg.fl, cfg.train
    if dp.mode == "sample":  # DP-SGD: the smallest client samples at the highest rate, every round
        n = min(facts.sizes)
        return {(sample_rate(train.batch_size * train.grad_accum, n), sigma): num_local_steps(train, n) * fl.rounds}
    if driver == "async":
        per_step = fl.asynchronous.buffer_size if fl.strategy == "fedbuff" else 1
        trips = math.ceil(max(expected_trips(facts.latency_s, facts.active, fl.rounds * per_step)))
        return {(1.0, sigma): trips}
    if dp.mode == "local":  # every round it may take part in (the worst case)
        return {(1.0, sigma): fl.rounds}
    if driver == "hier" and dp.noise_at == "edge":
        return {(fl.fraction, edge_sigma(sigma, fl.hier.kappa2)): fl.rounds}
    return {(fl.fraction, sigma): fl.rounds}


def resolve(cfg: RunConfig, facts: Facts, driver: str) -> ClientDP:
    """``privacy.dp`` with sigma given or calibrated, and delta defaulted to 1 / (10 n), n the clients
    (client-level) or the smallest client's examples (sample-level)."""
    dp = cfg.privacy.dp
    n = min(facts.sizes) if dp.mode == "sample" else cfg.data.num_clients - len(cfg.privacy.unlearn.exclude)
    if dp.target_delta is not None and dp.target_delta >= 1 / n:
        raise ConfigError(f"privacy.dp.target_delta must be < 1/n = 1/{n} (the smallest client's examples, for "
                          f"DP-SGD): delta >= 1/n allows publishing one example outright (got {dp.target_delta})")
    delta = dp.target_delta if dp.target_delta is not None else default_delta(n)
    sigma = dp.noise_multiplier
    if sigma is None:
        assert dp.target_epsilon is not None  # config: exactly one of the two
        sigma = acc.calibrate_sigma(lambda s: _plan(cfg, facts, driver, s), dp.target_epsilon, delta, dp.accountant)
    q = cfg.fl.fraction if driver in ("sync", "hier") else 1.0
    return ClientDP(dp.mode, float(sigma), dp.clipping_norm, q, delta, dp.accountant, dp.noise_at)


class Privacy:
    """What the FL drivers call when ``privacy.dp`` is on (central, local or sample)."""

    def __init__(self, cfg: RunConfig, facts: Facts, driver: str) -> None:
        self.cfg, self.driver = cfg, driver
        self.dp = resolve(cfg, facts, driver)
        self.excluded = tuple(cfg.privacy.unlearn.exclude)

    # --- the client side ---

    def dpsgd(self) -> DPSGD | None:
        """DP-SGD's settings for each client's trip (``privacy/dpsgd.py``), None unless mode sample."""
        return DPSGD(self.dp.sigma, self.dp.clip) if self.dp.mode == "sample" else None

    def transforms(self) -> list[Any]:
        """Prepended to ``fl.uplink``: clip to C; local mode also noises; DP-SGD adds none."""
        if self.dp.mode == "sample":
            return []
        chain: list[Any] = [Clip(self.dp.clip)]
        if self.dp.mode == "local":
            chain.append(LocalNoise(self.dp.sigma, self.dp.clip, self.cfg.seed))
        return chain

    def select(self, num_clients: int, rng: np.random.Generator) -> list[int] | None:
        """The synchronous cohort under client-level DP: Poisson with rate fl.fraction (what the
        accountant assumes); None: the strategy's own selection (DP-SGD samples within clients)."""
        if self.dp.mode == "sample":
            return None
        return poisson_select(num_clients, self.dp.q, rng, self.excluded)

    # --- the aggregator side ---

    def noise(self, like: State, *keys: int) -> State:
        return gaussian_noise(like, self.dp.sigma * self.dp.clip, torch_seed_for(self.cfg.seed, Purpose.DP_NOISE, *keys))

    def release(self, ledger: acc.Ledger, jobs: Sequence[Any], updates: Sequence[Any], population: dict[str, int],
                starts: dict[str, State], round_idx: int, tier: int = 0, edge: int = 0,
                record: bool = True) -> list[Any]:
        """A synchronous aggregation's input. Central: for every adapter (``starts``: name -> the
        adapter its clients started from; ``population``: how many clients it serves), one noised
        mean of its clients' clipped updates with denominator q N, released even when Poisson
        sampling picked none of them (then start + z / (q N)), as the accountant assumes; a key a
        client did not send counts as no change. Local and DP-SGD: the clients' own ``updates``.
        Records the steps in ``ledger`` unless ``record`` is False (an edge round: hierfavg's kappa2
        edge steps are accounted once per cloud round, ``record_hier``)."""
        if self.dp.mode != "central":
            if record:
                self.record_uploads(ledger, jobs)
            return list(updates)
        out: list[Any] = []
        for name in sorted(n for n in starts if population.get(n, 0) > 0):
            group = [j for j in jobs if j.update.adapter == name]
            start = group[0].start if group else starts[name]
            mean = noised_mean(start, [j.update.state for j in group], self.dp.q * population[name],
                               self.noise(start, round_idx, tier, edge, zlib.crc32(name.encode())))
            out.append(Released(mean, name))
        if record:
            self._record_central(ledger, [r.adapter for r in out])
        return out

    def _record_central(self, ledger: acc.Ledger, adapters: Sequence[str]) -> None:
        """One central step for each released adapter, and one for every client (each is in one)."""
        for name in adapters:
            acc.record(ledger, name, self.dp.q, self.dp.sigma)
        if adapters:
            acc.record(ledger, ALL, self.dp.q, self.dp.sigma)

    def record_secure(self, ledger: acc.Ledger, jobs: Sequence[Any], adapters: Sequence[str]) -> None:
        """A securely aggregated round: central DP's noise was added by the clients (at least
        N(0, (sigma C)^2) in any sum that can be unmasked, ``fl/secure.py``), one step per adapter
        released; local DP and DP-SGD: the uploads."""
        if self.dp.mode != "central":
            self.record_uploads(ledger, jobs)
            return
        self._record_central(ledger, adapters)

    def record_uploads(self, ledger: acc.Ledger, jobs: Sequence[Any]) -> None:
        """Local DP: each upload is one Gaussian step of its client; DP-SGD: the steps each trip ran
        (``ClientUpdate.dp_steps``: sampling rate, sigma, count)."""
        for j in jobs:
            party = f"client{j.client}"
            if self.dp.mode == "local":
                acc.record(ledger, party, 1.0, self.dp.sigma)
            for q, sigma, count in getattr(j.update, "dp_steps", ()):
                acc.record(ledger, party, q, sigma, count)

    def record_hier(self, ledger: acc.Ledger, jobs: Sequence[Any]) -> None:
        """One cloud round of hierfavg: kappa2 edge steps on the same sampled devices (noise at the
        edge: one Gaussian of sigma / sqrt(kappa2)) or one cloud step; local and DP-SGD: the uploads."""
        if self.dp.mode != "central":
            self.record_uploads(ledger, jobs)
            return
        sigma = edge_sigma(self.dp.sigma, self.cfg.fl.hier.kappa2) if self.dp.noise_at == "edge" else self.dp.sigma
        acc.record(ledger, ALL, self.dp.q, sigma)

    def async_noise(self, like: State, version: int, arrival: int) -> State | None:
        """Central DP on the async driver: the noise of the server step this arrival may complete."""
        return self.noise(like, version, arrival, 2) if self.dp.mode == "central" else None

    def record_async(self, ledger: acc.Ledger, step: Sequence[tuple[int, float]]) -> None:
        """Central DP, one server step: (client, its update's sensitivity weight) for each update
        folded in; a client's sensitivity is C times the sum of its weights in the step."""
        if self.dp.mode != "central":
            return  # the uploads were recorded as they arrived (record_uploads)
        weight: dict[int, float] = {}
        for k, w in step:
            weight[k] = weight.get(k, 0.0) + w
        for k, w in sorted(weight.items()):
            if w > 0:
                acc.record(ledger, f"client{k}", 1.0, self.dp.sigma / w)

    # --- what the run reports ---

    def report(self, ledger: acc.Ledger) -> dict[str, Any]:
        """The metrics line's ``privacy`` block: epsilon (the worst-off client's), delta, sigma, and
        epsilon per cluster (central, several adapters) or the spread over clients (local, async)."""
        eps = _epsilons(ledger, self.dp.delta, self.dp.accountant)
        clients = {p: e for p, e in eps.items() if p.startswith("client")}
        worst = eps.get(ALL, 0.0) if ALL in eps else max(clients.values(), default=0.0)
        out: dict[str, Any] = {"epsilon": worst, "delta": self.dp.delta, "noise_multiplier": self.dp.sigma,
                               "clipping_norm": self.dp.clip, "mode": self.dp.mode, "accountant": self.dp.accountant,
                               "sampling_rate": self.dp.q}
        clusters = {p: e for p, e in eps.items() if p not in (ALL,) and not p.startswith("client")}
        if len(clusters) > 1:
            out["epsilon_per_cluster"] = clusters
        if clients:
            values = sorted(clients.values())
            out["epsilon_clients"] = {"max": values[-1], "median": float(np.median(values)), "min": values[0],
                                      "count": len(values)}
        return out


def _epsilons(ledger: acc.Ledger, delta: float, accountant: str) -> dict[str, float]:
    """Each party's epsilon, computed once per distinct step history (many clients share one)."""
    cache: dict[frozenset[tuple[acc.Step, int]], float] = {}
    out = {}
    for party, steps in ledger.items():
        key = frozenset(steps.items())
        if key not in cache:
            cache[key] = acc.epsilon(steps, delta, accountant)
        out[party] = cache[key]
    return out


def load_ledger(aux_meta: dict[str, Any]) -> acc.Ledger:
    return acc.from_json(aux_meta.get(AUX_KEY, {}))


def save_ledger(aux_meta: dict[str, Any], ledger: acc.Ledger) -> None:
    aux_meta[AUX_KEY] = acc.to_json(ledger)
