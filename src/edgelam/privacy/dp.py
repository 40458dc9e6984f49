"""Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Alg. 1)
and its local and asynchronous variants, as pure functions plus the run's mechanism settings.

Every client clips its delta (update - start) to L2 norm C before it is sent (``fl/transforms.Clip``).
- central: the aggregator releases ``start + (sum_k delta_k + z) / (q N)``, z ~ N(0, (sigma C)^2 I),
  with the fixed denominator q N (q: Poisson sampling rate, N: the clients the adapter serves), so
  one client changes the released sum by at most C whatever the cohort (McMahan et al.'s
  fixed-denominator estimator). Clients are Poisson-sampled with rate ``fl.fraction``, which is
  what the accountant's amplification by sampling assumes.
- local: each client adds z ~ N(0, (sigma C)^2 I) to its own clipped delta; the server averages
  as usual and need not be trusted. Each upload is one Gaussian step of that client; no
  amplification, since the server sees who sent what.
- asynchronous (2503.21412, open problem 4): every server step adds N(0, (sigma C)^2) to what it
  folds in. FedAsync's step is one update (mixed with weight alpha s(tau): update and noise scale
  together, so sigma holds); FedBuff's is the buffer sum of s(tau_i) delta_i, in which a client with
  updates i in the buffer has sensitivity C sum_i s(tau_i), i.e. effective noise sigma / sum_i s(tau_i).
  The accountant records exactly that per client and step; no amplification is claimed (which
  clients take part depends on device speed, not on a random draw the accountant could use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

State = dict[str, Tensor]


@dataclass(frozen=True)
class ClientDP:
    """The run's client-level mechanism (``privacy.dp`` with sigma resolved)."""

    mode: str  # central | local
    sigma: float
    clip: float  # C
    q: float  # Poisson sampling rate of the synchronous cohorts (1: everyone)
    delta: float
    accountant: str
    noise_at: str  # hierfavg: edge | cloud


def poisson_select(num_clients: int, q: float, rng: np.random.Generator, excluded: Sequence[int] = ()) -> list[int]:
    """Each client independently with probability q (Poisson sampling; the cohort size is random and
    may be 0), minus ``excluded``. One uniform draw per client, so excluding one changes no other draw."""
    draws = rng.random(num_clients)
    return [k for k in range(num_clients) if draws[k] < q and k not in excluded]


def gaussian_noise(like: State, std: float, seed: int) -> State:
    """z ~ N(0, std^2 I) shaped like ``like`` (float64), from a generator seeded by ``seed``, drawn
    key by key in sorted order so the draw does not depend on dict order."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(like[k].shape, generator=gen, dtype=torch.float64) * std for k in sorted(like)}


def noised_mean(start: State, updates: Sequence[State], denominator: float, noise: State) -> State:
    """start + (sum_k (x_k - start) + z) / denominator: DP-FedAvg's release (fixed denominator q N)."""
    if denominator <= 0:
        raise ValueError(f"the DP denominator q N must be > 0 (got {denominator})")
    out = {}
    for k, s in start.items():
        total = noise[k].clone() if k in noise else torch.zeros(s.shape, dtype=torch.float64)
        for u in updates:
            total += u[k].double() - s.double()
        out[k] = (s.double() + total / denominator).to(s.dtype)
    return out


def add_noise(update: State, noise: State) -> State:
    return {k: (v.double() + noise[k]).to(v.dtype) if k in noise else v for k, v in update.items()}


def expected_trips(latency_s: Sequence[float], active: Sequence[int], arrivals: int) -> list[float]:
    """Asynchronous participation planned from device speed: ``arrivals`` uploads shared among the
    active clients in proportion to 1 / expected latency (the rate at which each returns)."""
    rates = [1.0 / max(latency_s[k], 1e-12) for k in active]
    total = sum(rates)
    return [arrivals * r / total for r in rates]


def default_delta(n: int) -> float:
    """1 / (10 n): comfortably below 1/n, the delta that would allow publishing one record outright."""
    return 1.0 / (10 * n)


def edge_sigma(sigma: float, kappa2: int) -> float:
    """kappa2 edge aggregations of the same sampled devices, each with noise sigma, compose to one
    Gaussian of noise sigma / sqrt(kappa2) (Gaussian composition: the squared inverses add)."""
    return sigma / math.sqrt(kappa2)
