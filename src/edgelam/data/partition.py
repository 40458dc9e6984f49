"""Partitioners: which example indices each client holds. Pure functions on labels and a generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle and deal ``n`` indices into ``num_clients`` near-equal shares."""
    perm = rng.permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def dirichlet(labels: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 1, max_tries: int = 100) -> list[list[int]]:
    """Label-skewed split: for each label, client shares ~ Dirichlet(alpha) (Hsu et al. 2019).

    Redraws until every client holds at least ``min_size`` examples.
    """
    labels_arr = np.asarray(labels)
    classes = sorted(set(labels_arr.tolist()))
    if len(labels_arr) < num_clients * min_size:
        raise ValueError(f"{len(labels_arr)} examples cannot give {num_clients} clients {min_size} each")
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"Dirichlet(alpha={alpha}) left a client with < {min_size} examples in {max_tries} draws; raise alpha")


def default_client_tasks(tasks: Sequence[str], num_clients: int) -> list[list[str]]:
    """Client i gets task i mod T (one task per client)."""
    return [[tasks[i % len(tasks)]] for i in range(num_clients)]


def by_task(labels: Sequence[str], client_tasks: Sequence[Sequence[str]], rng: np.random.Generator) -> list[list[int]]:
    """Client i holds only examples of tasks S_i; a task's examples are dealt among the clients that hold it."""
    labels_arr = np.asarray(labels)
    holders: dict[str, list[int]] = {}
    for k, tasks in enumerate(client_tasks):
        for t in tasks:
            holders.setdefault(t, []).append(k)
    unknown = sorted(set(holders) - set(labels_arr.tolist()))
    if unknown:
        raise ValueError(f"client tasks {unknown} have no examples; tasks present: {sorted(set(labels_arr.tolist()))}")
    parts: list[list[int]] = [[] for _ in client_tasks]
    for t, ks in holders.items():
        idx = rng.permutation(np.flatnonzero(labels_arr == t))
        for k, chunk in zip(ks, np.array_split(idx, len(ks))):
            parts[k].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]


def heldout_split(indices: Sequence[int], labels: Sequence[str], fraction: float,
                  rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Split one client's indices into (train, held-out), taking ``fraction`` of each task."""
    train, held = [], []
    by_label: dict[str, list[int]] = {}
    for i in indices:
        by_label.setdefault(labels[i], []).append(i)
    for lab in sorted(by_label):
        idx = [int(i) for i in rng.permutation(by_label[lab])]
        k = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(held)
