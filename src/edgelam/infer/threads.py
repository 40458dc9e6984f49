"""Thread budgets for module services that share a machine.

A service is one process with its own torch thread pool. Two things decide how well several of
them share the cores of one machine (a pipeline emulated on one box, or a real edge server that
hosts several modules):

- **waiting**: OpenMP's worker threads (torch's intra-op pool, GNU libgomp in the PyPI builds)
  keep spinning for a while after each parallel region by default. A stage that has just
  answered then burns the cores the next stage needs. ``OMP_WAIT_POLICY=PASSIVE`` makes idle
  workers sleep at once; EdgeLAM's services and coordinators set it unless the environment
  already says otherwise (it must be set before torch is imported: ``passive_threads``).
- **budget**: ``threads`` (torch intra-op threads) and ``cpus`` (the cores the process is pinned
  to, Linux ``sched_setaffinity``) per node in a topology file, or ``edgelam serve --threads N
  --cpus 0,1``. A single stream runs its stages one after another, so every stage may use every
  core (the default); concurrent sessions on one machine want disjoint cores per service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_threads() -> None:
    """Idle OpenMP workers sleep instead of spinning (unless ``OMP_WAIT_POLICY`` is set already).
    Call before torch is imported in this process; child processes inherit it."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def available_cpus() -> set[int]:
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if getter else set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Budget:
    threads: int | None = None  # None: torch's default (the cores the process may use)
    cpus: tuple[int, ...] | None = None  # None: not pinned

    def args(self) -> list[str]:
        """The ``edgelam serve`` options that apply this budget."""
        return ([f"--threads={self.threads}"] if self.threads else []) + (
            [f"--cpus={','.join(map(str, self.cpus))}"] if self.cpus else [])


def parse_cpus(text: str, where: str) -> tuple[int, ...]:
    """``"0,1"`` or ``"0-3"`` (or a mix) -> sorted core numbers, each one this machine has."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"{where}: cpus must be core numbers such as 0,1 or 0-3, got '{text}'")
        cpus |= set(range(int(lo), int(hi or lo) + 1))
    return check_cpus(sorted(cpus), where)


def check_cpus(cpus: list[int], where: str) -> tuple[int, ...]:
    have = available_cpus()
    missing = sorted(set(cpus) - have)
    if not cpus or missing:
        raise ValueError(f"{where}: cpus {cpus} name cores this process cannot use {missing}; "
                         f"available: {sorted(have)}")
    return tuple(cpus)


def budget_of(node: dict[str, Any], where: str) -> Budget:
    """A topology node's ``threads`` / ``cpus`` (both optional); ``ValueError`` naming the bad one."""
    threads, cpus = node.get("threads"), node.get("cpus")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{where}: threads must be an integer >= 1 (torch intra-op threads), got {threads!r}")
    if cpus is not None:
        if isinstance(cpus, str):
            return Budget(threads, parse_cpus(cpus, where))
        if not isinstance(cpus, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
            raise ValueError(f"{where}: cpus must be a list of core numbers such as [0, 1], got {cpus!r}")
        return Budget(threads, check_cpus(sorted(set(cpus)), where))
    return Budget(threads, None)


def apply(threads: int | None, cpus: tuple[int, ...] | None) -> dict[str, Any]:
    """Pin this process to ``cpus`` and size torch's pool (``threads``, else one per pinned core);
    returns what is in effect (for /info)."""
    import torch

    if cpus:
        os.sched_setaffinity(0, cpus)
    if threads or cpus:
        torch.set_num_threads(threads or len(cpus or ()))
    return {"threads": torch.get_num_threads(), "cpus": sorted(available_cpus()),
            "omp_wait_policy": os.environ.get(WAIT_POLICY, "default")}
