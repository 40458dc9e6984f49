"""Clustering of clients as pure functions: update vectors, cosine similarity, bipartition, k-means, purity."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import squareform
from torch import Tensor

State = dict[str, Tensor]


def flatten(state: State) -> Tensor:
    """All tensors of an adapter as one float64 vector, keys in sorted order."""
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def delta(new: State, old: State) -> State:
    return {k: new[k] - old[k] for k in old}


def cosine_matrix(vectors: Sequence[Tensor]) -> np.ndarray:
    """Pairwise cosine similarity of update vectors (CFL, Sattler et al. 2020, eq. 14)."""
    m = torch.stack([v / v.norm().clamp_min(1e-12) for v in vectors])
    return (m @ m.T).numpy()


def bipartition(similarity: np.ndarray) -> tuple[list[int], list[int]]:
    """Split into two groups by complete-linkage clustering on 1 - cosine (CFL's rule)."""
    n = similarity.shape[0]
    if n < 2:
        raise ValueError(f"need at least two clients to split a cluster (got {n})")
    dist = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="complete"), t=2, criterion="maxclust")
    a = [i for i in range(n) if labels[i] == labels[0]]
    return a, [i for i in range(n) if labels[i] != labels[0]]


def kmeans(features: np.ndarray, k: int, seed: int) -> list[int]:
    """k-means++ on the rows of ``features`` (standardized per column), deterministic by seed."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    k = min(k, len(x))
    _, labels = kmeans2(x, k, minit="++", seed=np.random.default_rng(seed))
    return [int(v) for v in labels]


def purity(predicted: Sequence[object], truth: Sequence[object]) -> float:
    """Share of items whose predicted cluster's majority true label equals their own."""
    if not predicted or len(predicted) != len(truth):
        raise ValueError(f"need equal, non-empty label lists (got {len(predicted)} and {len(truth)})")
    groups: dict[object, list[object]] = {}
    for p, t in zip(predicted, truth):
        groups.setdefault(p, []).append(t)
    return sum(Counter(ts).most_common(1)[0][1] for ts in groups.values()) / len(truth)
