"""Sensor windows to tokens, two ways, and what each representation costs on the uplink.

A window is ``W`` frames of ``F`` CSI amplitudes, each relative to its mean over the window
(``sensing.data.relative``); it is cut into ``T = W / P`` patches of ``P`` frames.

- **patch** (PatchTST / Time-LLM / LLM4CP style, papers.md §5.5): each patch summarised by its
  per-feature mean and standard deviation over its frames (2F numbers, ``descriptors``), which the
  task projects linearly into the backbone's embedding space;
- **vq**: the same summary replaced by the index of the nearest of K codebook vectors: the codes
  are new vocabulary entries of the model, whose embeddings are trained.

The codebook is learned federatedly before training (``federated_codebook``): each client runs
k-means on its own patches (scipy's ``kmeans2``, k-means++ start) and sends its K centroids and
their counts; the server runs a count-weighted k-means over all clients' centroids. No client's
windows leave it.

``uplink_bytes`` prices one window on the uplink three ways: raw CSI (the Intel 5300's packed
payload per frame), continuous embeddings (T vectors of the backbone's width) and tokens (T codes
of log2 K bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

from edgelam.sensing.wifi import payload_length

REPRESENTATIONS = ("raw", "embedding", "tokens")


def patches(windows: Tensor, patch: int) -> Tensor:
    """(N, W, F) windows -> (N, T, P, F) patches of ``patch`` frames (W must be a multiple of P)."""
    n, w, f = windows.shape
    if w % patch:
        raise ValueError(f"a window of {w} frames does not split into patches of {patch}")
    return windows.reshape(n, w // patch, patch, f)


def descriptors(p: Tensor) -> Tensor:
    """(N, T, P, F) patches -> (N, T, 2F): each feature's mean, then its std, over the patch's frames."""
    return torch.cat([p.mean(dim=2), p.std(dim=2, unbiased=False)], dim=-1)


def encode(x: Tensor, codebook: Tensor) -> Tensor:
    """The nearest codebook vector's index (int64) for each of ``x`` (..., D); codebook (K, D)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return torch.cdist(flat, codebook.float()).argmin(dim=1).reshape(x.shape[:-1])


def local_codebook(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's k-means (K centroids (K, D) float64 and how many of its vectors each holds)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < k:
        raise ValueError(f"a client holds {len(x)} patches, fewer than the codebook's {k} codes; "
                         f"lower sensing.codebook or give clients more windows")
    centroids, labels = kmeans2(x, k, minit="++", seed=seed)
    return centroids, np.bincount(labels, minlength=k).astype(np.float64)


def weighted_kmeans(x: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
                    iters: int = 50) -> np.ndarray:
    """Lloyd's k-means on points with weights (k-means++ start, weighted by mass): (K, D)."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    live = w > 0
    x, w = x[live], w[live]
    if len(x) < k:
        raise ValueError(f"{len(x)} non-empty centroids cannot make a codebook of {k}")
    centres = [x[rng.choice(len(x), p=w / w.sum())]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        mass = w * d2
        centres.append(x[rng.choice(len(x), p=mass / mass.sum())] if mass.sum() > 0 else x[rng.integers(len(x))])
    c = np.asarray(centres)
    for _ in range(iters):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = c.copy()
        for j in range(k):
            m = assign == j
            if m.any():
                new[j] = (w[m, None] * x[m]).sum(0) / w[m].sum()
        if np.allclose(new, c):
            break
        c = new
    return c


def federated_codebook(client_vectors: Sequence[np.ndarray], k: int, seed: int) -> Tensor:
    """The shared codebook (K, D) float32 from the clients' patch descriptors (see the module doc)."""
    parts = [local_codebook(v, k, seed + i) for i, v in enumerate(client_vectors)]
    cents = np.concatenate([c for c, _ in parts])
    counts = np.concatenate([n for _, n in parts])
    book = weighted_kmeans(cents, counts, k, np.random.default_rng(seed))
    return torch.from_numpy(book).float()


def corrupt(inputs: Tensor, rate: float, gen: torch.Generator, codebook_size: int | None) -> Tensor:
    """Tokens lost on the uplink, each with probability ``rate``: a code is replaced by a uniformly
    random one (``codebook_size`` given: (N, T) codes), a continuous patch is zeroed ((N, T, D))."""
    if rate <= 0:
        return inputs
    lost = torch.rand(inputs.shape[:2], generator=gen) < rate
    if codebook_size is not None:
        return torch.where(lost, torch.randint(0, codebook_size, inputs.shape, generator=gen), inputs)
    return inputs.masked_fill(lost.unsqueeze(-1), 0.0)


def uplink_bytes(representation: str, window: int, n_rx: int, n_tx: int, tokens: int, d_model: int,
                 codebook: int, bytes_per_value: int = 4) -> int:
    """Bytes one window takes on the uplink: ``raw`` Intel 5300 CSI (``window`` frames of the CSI
    Tool's packed payload), ``embedding`` (``tokens`` vectors of ``d_model`` values) or ``tokens``
    (``tokens`` codes of ceil(log2 K) bits, packed)."""
    if representation == "raw":
        return window * payload_length(n_rx, n_tx)
    if representation == "embedding":
        return tokens * d_model * bytes_per_value
    if representation == "tokens":
        return math.ceil(tokens * math.ceil(math.log2(codebook)) / 8)
    raise ValueError(f"representation must be one of {list(REPRESENTATIONS)}, got {representation!r}")
