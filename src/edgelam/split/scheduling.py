"""Which devices train this round and how they share the band: the online Lyapunov algorithm and baselines.

System (arXiv 2407.02924, reconstructed in the project's research notes): device k, scheduled
(a_k = 1) with bandwidth fraction beta_k, has rates r(beta) = beta B log2(1 + p g / (beta B N0))
on the uplink (device power p) and the downlink (server power), round latency
T_k(beta) = compute_k + U_k / r_up(beta) + D_k / r_down(beta) and energy
E_k(beta) = compute energy_k + p U_k / r_up(beta) (U, D: the round's bits up and down).

The long-term problem minimises (1/T) sum_t omega_t / N_t (the convergence-bound term of the
number of scheduled devices N_t) subject to T_k <= T_max each round, sum beta <= 1 and the long-term
budget (1/T) sum_t a_k E_k <= E_bar_k. Virtual queues Q_k(t+1) = max(Q_k + a_k E_k - E_bar_k, 0)
turn the budget into a per-round drift-plus-penalty problem

    min  V omega_t / N_t + sum_k Q_k a_k E_k(beta_k)   s.t.  T_k(beta_k) <= T_max,  sum beta_k <= 1,

solved by: the least bandwidth meeting the deadline per device (bisection); then the device subset.
For a fixed subset the leftover band is water-filled on sum Q_k E_k(beta_k) (convex, decreasing;
bisection on the Lagrange multiplier; an empty queue counts as TIE_BREAK x the largest queue, so
it still gets band by its value). Choosing the subset is knapsack-like (the deadline floors must
fit in the band), so up to EXACT_MAX_DEVICES feasible devices every subset is searched: best
first by a lower bound (each device alone given all the band the others' floors leave,
V omega / n + sum Q_k E_k(1 - sum_{j != k} floor_j)), water-filling only the subsets whose bound
beats the best objective so far. Exact up to the water-filling tolerance (the tests check it
against SLSQP brute force on heterogeneous loads). Beyond that limit, a fallback: for each n, fill
greedily by the cost at an equal share, skipping devices whose floor no longer fits. Ties go to
more devices.
The budget may be on latency instead of energy (``quantity = "latency"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

LN2 = math.log(2.0)
TIE_BREAK = 1e-3  # weight of an empty queue in the water-filling, relative to the largest queue
EXACT_MAX_DEVICES = 16  # exhaustive subset search up to here (2^16 bounds, vectorised); greedy beyond


@dataclass(frozen=True)
class Radio:
    """The edge server's band, shared by FDMA: fractions of both the uplink and the downlink."""

    uplink_hz: float
    downlink_hz: float
    server_power_w: float
    noise_w_per_hz: float  # N0 (noise figure included)


@dataclass(frozen=True)
class DeviceLoad:
    """One device's round as the scheduler sees it (all known before the round runs)."""

    device: int
    up_bits: float
    down_bits: float
    compute_s: float  # device + server compute time (does not depend on bandwidth)
    compute_energy_j: float  # device compute energy
    tx_power_w: float
    gain: float  # linear channel gain this round (large scale x fading)


def rate_bps(beta: float, bandwidth_hz: float, power_w: float, gain: float, n0: float) -> float:
    """r = beta B log2(1 + p g / (beta B N0)); 0 at beta = 0."""
    if beta <= 0:
        return 0.0
    w = beta * bandwidth_hz
    return w * math.log2(1.0 + power_w * gain / (w * n0))


def _rate_slope(beta: float, bandwidth_hz: float, power_w: float, gain: float, n0: float) -> float:
    """d r / d beta = B [log2(1 + s/beta) - (s/beta) / ((1 + s/beta) ln 2)], s = p g / (B N0)."""
    x = power_w * gain / (bandwidth_hz * n0) / beta
    return bandwidth_hz * (math.log2(1.0 + x) - x / ((1.0 + x) * LN2))


def latency_s(load: DeviceLoad, radio: Radio, beta: float) -> float:
    if beta <= 0:
        return math.inf
    up = rate_bps(beta, radio.uplink_hz, load.tx_power_w, load.gain, radio.noise_w_per_hz)
    down = rate_bps(beta, radio.downlink_hz, radio.server_power_w, load.gain, radio.noise_w_per_hz)
    return load.compute_s + load.up_bits / up + (load.down_bits / down if load.down_bits else 0.0)


def energy_j(load: DeviceLoad, radio: Radio, beta: float) -> float:
    if beta <= 0:
        return math.inf
    up = rate_bps(beta, radio.uplink_hz, load.tx_power_w, load.gain, radio.noise_w_per_hz)
    return load.compute_energy_j + load.tx_power_w * load.up_bits / up


def _slope(load: DeviceLoad, radio: Radio, beta: float, quantity: str) -> float:
    """d/dbeta of the queued quantity (energy or latency); negative."""
    n0 = radio.noise_w_per_hz
    up, dup = (rate_bps(beta, radio.uplink_hz, load.tx_power_w, load.gain, n0),
               _rate_slope(beta, radio.uplink_hz, load.tx_power_w, load.gain, n0))
    if quantity == "energy":
        return -load.tx_power_w * load.up_bits * dup / up**2
    down, ddown = (rate_bps(beta, radio.downlink_hz, radio.server_power_w, load.gain, n0),
                   _rate_slope(beta, radio.downlink_hz, radio.server_power_w, load.gain, n0))
    return -load.up_bits * dup / up**2 - load.down_bits * ddown / down**2


def quantity_of(load: DeviceLoad, radio: Radio, beta: float, quantity: str) -> float:
    return energy_j(load, radio, beta) if quantity == "energy" else latency_s(load, radio, beta)


def min_share(load: DeviceLoad, radio: Radio, t_max_s: float, tol: float = 1e-10) -> float | None:
    """The least bandwidth fraction with T_k <= T_max (latency falls as beta grows); None if even
    the whole band is too slow."""
    if latency_s(load, radio, 1.0) > t_max_s:
        return None
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if latency_s(load, radio, mid) <= t_max_s else (mid, hi)
    return hi


@dataclass
class Decision:
    policy: str
    scheduled: list[int]  # device ids, ascending
    shares: dict[int, float]  # bandwidth fraction of each scheduled device
    infeasible: list[int] = field(default_factory=list)  # cannot meet T_max even with the whole band
    status: str = "ok"  # ok | infeasible (no device can meet the deadline this round)
    objective: float | None = None  # drift-plus-penalty value of the choice (lyapunov)
    min_shares: dict[int, float] = field(default_factory=dict)


def waterfill(loads: Sequence[DeviceLoad], radio: Radio, queues: Sequence[float], floors: Sequence[float],
              quantity: str = "energy", iters: int = 60) -> list[float]:
    """Shares beta_k >= floor_k with sum = 1 minimising sum_k Q_k f_k(beta_k), f convex decreasing.

    KKT: beta_k = floor_k where -Q_k f_k'(floor_k) <= lambda, else -Q_k f_k'(beta_k) = lambda; the
    total falls as lambda grows, so lambda is found by bisection. With every Q_k = 0 any split is
    optimal, and the leftover is shared in proportion to the floors."""
    floors = list(floors)
    left = 1.0 - sum(floors)
    if left <= 1e-15:
        return floors
    if all(q <= 0 for q in queues):
        return [f / sum(floors) for f in floors]

    def marginal(k: int, beta: float) -> float:
        return -queues[k] * _slope(loads[k], radio, beta, quantity)

    def share(k: int, lam: float) -> float:
        if queues[k] <= 0 or marginal(k, floors[k]) <= lam:
            return floors[k]
        if marginal(k, 1.0) >= lam:
            return 1.0
        lo, hi = floors[k], 1.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if marginal(k, mid) > lam else (lo, mid)
        return 0.5 * (lo + hi)

    lo, hi = 0.0, max(marginal(k, floors[k]) for k in range(len(loads)))
    for _ in range(iters):
        lam = 0.5 * (lo + hi)
        total = sum(share(k, lam) for k in range(len(loads)))
        lo, hi = (lam, hi) if total > 1.0 else (lo, lam)
    betas = [share(k, hi) for k in range(len(loads))]
    spare = 1.0 - sum(betas)  # bisection leaves a sliver; give it to the device that values it most
    if spare > 0:
        best = max(range(len(loads)), key=lambda k: marginal(k, betas[k]))
        betas[best] += spare
    return betas


def _quantity_vec(load: DeviceLoad, radio: Radio, beta: np.ndarray, quantity: str) -> np.ndarray:
    """quantity_of for an array of shares beta > 0 (the subset bounds)."""
    n0 = radio.noise_w_per_hz
    w_up = beta * radio.uplink_hz
    up = w_up * np.log2(1.0 + load.tx_power_w * load.gain / (w_up * n0))
    if quantity == "energy":
        return load.compute_energy_j + load.tx_power_w * load.up_bits / up
    if not load.down_bits:
        return load.compute_s + load.up_bits / up
    w_down = beta * radio.downlink_hz
    down = w_down * np.log2(1.0 + radio.server_power_w * load.gain / (w_down * n0))
    return load.compute_s + load.up_bits / up + load.down_bits / down


def _exact_candidates(loads: Sequence[DeviceLoad], radio: Radio, queues: Sequence[float], floors: Sequence[float],
                      v_omega: float, quantity: str) -> Iterator[tuple[float, list[int]]]:
    """Every subset whose floors fit in the band, with a lower bound on its objective, best first
    (ties: more devices, then less band taken by floors). Bound: device k gets at most the band the
    others' floors leave, 1 - F_S + floor_k, and E_k falls with its share."""
    m = len(loads)
    masks = np.arange(1, 1 << m)
    bits = ((masks[:, None] >> np.arange(m)) & 1).astype(bool)  # (2^m - 1, m)
    f = np.asarray(floors)
    taken = bits @ f  # (2^m - 1,) sum of floors F_S
    keep = taken <= 1.0 + 1e-12
    bits, taken = bits[keep], taken[keep]
    n = bits.sum(axis=1)
    bound = v_omega / n
    for k in range(m):
        if queues[k] > 0:
            most = np.maximum(1.0 - taken + f[k], f[k])
            bound = bound + np.where(bits[:, k], queues[k] * _quantity_vec(loads[k], radio, most, quantity), 0.0)
    for i in np.lexsort((taken, -n, bound)):
        yield float(bound[i]), [int(k) for k in np.flatnonzero(bits[i])]


def _greedy_candidates(loads: Sequence[DeviceLoad], radio: Radio, queues: Sequence[float], floors: Sequence[float],
                       quantity: str) -> list[tuple[float, list[int]]]:
    """Fallback beyond EXACT_MAX_DEVICES: for each n, the devices cheapest at an equal share (at least
    their floor), skipping any whose floor no longer fits, until n are in. No bound (-inf)."""
    out: list[tuple[float, list[int]]] = []
    for n in range(1, len(loads) + 1):
        cost = [queues[k] * quantity_of(loads[k], radio, max(floors[k], 1.0 / n), quantity) for k in range(len(loads))]
        chosen: list[int] = []
        for k in sorted(range(len(loads)), key=lambda k: (cost[k], floors[k], k)):
            if len(chosen) < n and sum(floors[j] for j in chosen) + floors[k] <= 1.0 + 1e-12:
                chosen.append(k)
        if len(chosen) == n:
            out.append((-math.inf, sorted(chosen)))
    return out


def lyapunov(loads: Sequence[DeviceLoad], radio: Radio, queues: Sequence[float], v: float, omega: float,
             t_max_s: float, quantity: str = "energy") -> Decision:
    """Solve the per-round drift-plus-penalty problem (module docstring); ``queues`` by device id."""
    floors: dict[int, float] = {}
    infeasible = []
    for ld in loads:
        b = min_share(ld, radio, t_max_s)
        if b is None:
            infeasible.append(ld.device)
        else:
            floors[ld.device] = b
    if not floors:
        return Decision("lyapunov", [], {}, sorted(infeasible), status="infeasible")
    ids = sorted(floors)  # candidate positions 0..m-1 index into ids
    by_id = {ld.device: ld for ld in loads}
    cand_loads, cand_q, cand_f = [by_id[k] for k in ids], [queues[k] for k in ids], [floors[k] for k in ids]
    tie = TIE_BREAK * max([1.0] + cand_q)
    candidates: Iterable[tuple[float, list[int]]] = (
        _exact_candidates(cand_loads, radio, cand_q, cand_f, v * omega, quantity) if len(ids) <= EXACT_MAX_DEVICES
        else _greedy_candidates(cand_loads, radio, cand_q, cand_f, quantity))
    best: tuple[float, list[int], list[float]] | None = None
    for bound, subset in candidates:
        slack = 1e-9 * max(1.0, abs(best[0])) if best else 0.0
        if best is not None and bound > best[0] + slack:
            break  # sorted by bound: nothing later can win
        if best is not None and bound >= best[0] - slack and len(subset) <= len(best[1]):
            continue  # at best a tie, and ties go to more devices
        # Devices with an empty queue are indifferent to the leftover band in the slot problem; a small
        # tie-break weight hands them their share of it by its value instead of leaving them at the floor.
        betas = waterfill([cand_loads[i] for i in subset], radio, [cand_q[i] + tie for i in subset],
                          [cand_f[i] for i in subset], quantity)
        j = v * omega / len(subset) + sum(cand_q[i] * quantity_of(cand_loads[i], radio, b, quantity)
                                          for i, b in zip(subset, betas))
        tol = 1e-12 * max(1.0, abs(best[0])) if best else 0.0
        if best is None or j < best[0] - tol or (j <= best[0] + tol and len(subset) > len(best[1])):
            best = (j, subset, betas)
    assert best is not None, "a single feasible device always fits the band (floor <= 1)"
    chosen = [ids[i] for i in best[1]]
    shares = dict(zip(chosen, best[2]))
    return Decision("lyapunov", sorted(chosen), {k: shares[k] for k in sorted(chosen)}, sorted(infeasible),
                    objective=best[0], min_shares={k: floors[k] for k in ids})


def baseline(policy: str, loads: Sequence[DeviceLoad], num_devices: int, rng: np.random.Generator) -> Decision:
    """all: every device; random: ``num_devices`` uniformly; greedy: the ``num_devices`` best channels.
    Equal bandwidth shares; no deadline (a device may exceed T_max, which the run reports)."""
    ids = [ld.device for ld in loads]
    if policy == "all":
        chosen = ids
    elif policy == "random":
        chosen = [ids[i] for i in rng.choice(len(ids), size=min(num_devices, len(ids)), replace=False)]
    elif policy == "greedy":
        chosen = [ld.device for ld in sorted(loads, key=lambda ld: (-ld.gain, ld.device))[:num_devices]]
    else:
        raise ValueError(f"unknown scheduling policy '{policy}'")
    chosen = sorted(chosen)
    return Decision(policy, chosen, {k: 1.0 / len(chosen) for k in chosen})


def update_queues(queues: Sequence[float], spent: dict[int, float], budget: Sequence[float]) -> list[float]:
    """Q_k(t+1) = max(Q_k(t) + a_k x_k - budget_k, 0), x = the energy (or latency) device k spent."""
    return [max(q + spent.get(k, 0.0) - budget[k], 0.0) for k, q in enumerate(queues)]
