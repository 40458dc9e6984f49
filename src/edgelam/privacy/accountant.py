"""Privacy accounting with Google's ``dp-accounting`` (RDP: Mironov 2017, Mironov et al. 2019; PLD:
Koskela et al. 2020, Doroshenko et al. 2022): what a run spent, from what actually happened.

A ledger is plain data: for each party (``"all"`` for a mechanism every client shares, else a
client or cluster name), counts of identical steps keyed by (sampling rate q, noise multiplier
sigma). A step is one release of a Gaussian mechanism of L2 sensitivity 1 (after clipping and
scaling) with noise sigma, applied to a Poisson sample of rate q (q = 1: everyone it concerns);
``epsilon`` composes them with the library's accountant. Counting identical steps keeps the
composition one ``SelfComposedDpEvent`` per kind, however long the run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping

import dp_accounting as dpa
from dp_accounting import pld, rdp

Step = tuple[float, float]  # (sampling rate q, noise multiplier sigma)
Ledger = dict[str, dict[Step, int]]  # party -> step kind -> count

ACCOUNTANTS: dict[str, Callable[[], dpa.PrivacyAccountant]] = {
    "rdp": rdp.RdpAccountant, "pld": lambda: pld.PLDAccountant(value_discretization_interval=1e-3),
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs a warning per RDP order it cannot evaluate at tiny q; the bound stays valid."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def event(steps: Mapping[Step, int]) -> dpa.DpEvent:
    """The composition of ``steps``: Gaussian(sigma) on a Poisson sample of rate q, count times each."""
    parts: list[dpa.DpEvent] = []
    for (q, sigma), count in sorted(steps.items()):
        if count <= 0:
            continue
        one: dpa.DpEvent = dpa.GaussianDpEvent(sigma)
        if q < 1:
            one = dpa.PoissonSampledDpEvent(q, one)
        parts.append(dpa.SelfComposedDpEvent(one, count))
    return dpa.ComposedDpEvent(parts) if parts else dpa.NoOpDpEvent()


def epsilon(steps: Mapping[Step, int], delta: float, accountant: str = "rdp") -> float:
    """The epsilon of (epsilon, delta)-DP after ``steps`` (0 before any step)."""
    if not any(c > 0 for c in steps.values()):
        return 0.0
    with _quiet():
        return float(ACCOUNTANTS[accountant]().compose(event(steps)).get_epsilon(delta))


def ledger_epsilon(ledger: Ledger, delta: float, accountant: str = "rdp") -> dict[str, float]:
    """Each party's epsilon."""
    return {party: epsilon(steps, delta, accountant) for party, steps in sorted(ledger.items())}


def calibrate_sigma(plan: Callable[[float], Mapping[Step, int]], target_epsilon: float, delta: float,
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier sigma whose planned steps ``plan(sigma)`` spend at most
    ``target_epsilon`` (dp-accounting's bracketing search)."""
    with _quiet():
        try:
            return float(dpa.calibrate_dp_mechanism(ACCOUNTANTS[accountant], lambda s: event(plan(s)), target_epsilon,
                                                    delta, tol=1e-4))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta:.3g} for the planned "
                             f"steps ({exc}); raise privacy.dp.target_epsilon or lower fl.rounds") from None


def record(ledger: Ledger, party: str, q: float, sigma: float, count: int = 1) -> None:
    steps = ledger.setdefault(party, {})
    key = (float(q), float(sigma))
    steps[key] = steps.get(key, 0) + count


def to_json(ledger: Ledger) -> dict[str, list[list[float]]]:
    """For the checkpoint's JSON metadata: party -> [[q, sigma, count], ...]."""
    return {p: [[q, s, c] for (q, s), c in sorted(steps.items())] for p, steps in ledger.items()}


def from_json(data: Mapping[str, list[list[float]]]) -> Ledger:
    return {p: {(float(q), float(s)): int(c) for q, s, c in rows} for p, rows in data.items()}
