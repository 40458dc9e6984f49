"""Heterogeneous-rank LoRA as pure functions on adapter state dicts.

An adapter holds, per adapted module m, A_m (r x d_in) under "m.lora_A.weight" and B_m (d_out x r)
under "m.lora_B.weight"; PEFT computes W x + s B A x with s = alpha / r. A client of rank r_k
trains the first r_k components (rows of A, columns of B); the others stay exactly zero (their
gradients vanish while both factors are zero), and only the first r_k travel. Any other key (a
trainable head under modules_to_save, a bias) has no rank: the helpers pass it through unchanged,
and aggregation averages it by samples (``others``, ``average_others``).
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import numpy as np
import torch
from torch import Tensor

from edgelam.fl.aggregate import weighted_average

State = dict[str, Tensor]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def modules(adapter: State) -> list[str]:
    return sorted(k[: -len(A_SUFFIX)] for k in adapter if k.endswith(A_SUFFIX))


def is_lora(key: str) -> bool:
    return key.endswith((A_SUFFIX, B_SUFFIX))


def others(adapter: State) -> State:
    """The keys with no rank (not a LoRA factor): passed through by every rank helper."""
    return {k: v for k, v in adapter.items() if not is_lora(k)}


def average_others(adapters: Sequence[State], weights: Sequence[float]) -> State:
    """The sample-weighted average of the non-LoRA keys (empty when there are none)."""
    rest = [others(a) for a in adapters]
    return weighted_average(rest, weights) if rest[0] else {}


def rank_of(adapter: State) -> int:
    return int(adapter[modules(adapter)[0] + A_SUFFIX].shape[0])


def truncate(adapter: State, r: int) -> State:
    """The first r components: A[:r], B[:, :r] (what a rank-r client sends or receives)."""
    out = {k: v.clone() for k, v in others(adapter).items()}
    for m in modules(adapter):
        out[m + A_SUFFIX] = adapter[m + A_SUFFIX][:r].clone()
        out[m + B_SUFFIX] = adapter[m + B_SUFFIX][:, :r].clone()
    return out


def pad(adapter: State, r_max: int) -> State:
    """Zero-pad a rank-r adapter to r_max components (HetLoRA, Cho et al. 2024)."""
    out = dict(others(adapter))
    for m in modules(adapter):
        a, b = adapter[m + A_SUFFIX], adapter[m + B_SUFFIX]
        out[m + A_SUFFIX] = torch.cat([a, a.new_zeros(r_max - a.shape[0], a.shape[1])])
        out[m + B_SUFFIX] = torch.cat([b, b.new_zeros(b.shape[0], r_max - b.shape[1])], dim=1)
    return out


def mask_rank(adapter: State, r: int) -> State:
    """Same shapes, components r.. set to zero: a rank-r adapter in a rank-r_max model."""
    return pad(truncate(adapter, r), rank_of(adapter))


def stack(adapters: Sequence[State], weights: Sequence[float]) -> dict[str, tuple[Tensor, Tensor]]:
    """FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): per module B_s = [B_1 .. B_K] (d_out x sum r_k),
    A_s = [p_1 A_1; ..; p_K A_K] (sum r_k x d_in), so that B_s A_s = sum_k p_k B_k A_k exactly.
    LoRA modules only; the other keys are averaged apart (``average_others``)."""
    total = float(sum(weights))
    out = {}
    for m in modules(adapters[0]):
        bs = torch.cat([a[m + B_SUFFIX] for a in adapters], dim=1)
        as_ = torch.cat([(w / total) * a[m + A_SUFFIX] for a, w in zip(adapters, weights)], dim=0)
        out[m] = (bs, as_)
    return out


def product_sum(adapters: Sequence[State], weights: Sequence[float], scaling: float) -> State:
    """Per module the dense update s * sum_k p_k B_k A_k (d_out x d_in), computed by stacking."""
    return {m: scaling * (b @ a) for m, (b, a) in stack(adapters, weights).items()}


def svd_factors(delta: State, r_max: int, scaling: float) -> State:
    """FlexLoRA (Bai et al., NeurIPS 2024): the best rank-r_max factors of delta / s by SVD,
    B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, so a rank-r client takes their first r components."""
    out = {}
    for m, d in delta.items():
        u, s, vh = torch.linalg.svd((d / scaling).double(), full_matrices=False)
        k = min(r_max, s.shape[0])
        root = s[:k].sqrt()
        b = torch.zeros(d.shape[0], r_max, dtype=d.dtype)
        a = torch.zeros(r_max, d.shape[1], dtype=d.dtype)
        b[:, :k] = (u[:, :k] * root).to(d.dtype)
        a[:k] = (root[:, None] * vh[:k]).to(d.dtype)
        out[m + B_SUFFIX], out[m + A_SUFFIX] = b, a
    return out


def lora_norm(adapter: State, lo: int = 0, hi: int | None = None) -> float:
    """||Delta W||_F of components lo..hi-1 over the whole adapter: sqrt(sum_m ||B_m[:, lo:hi] A_m[lo:hi]||_F^2)
    (the scaling s is left out: it is the same for every client and cancels in the weights)."""
    total = 0.0
    for m in modules(adapter):
        a, b = adapter[m + A_SUFFIX][lo:hi].double(), adapter[m + B_SUFFIX][:, lo:hi].double()
        total += float(torch.linalg.matrix_norm(b @ a) ** 2)
    return math.sqrt(total)


def norm_weights(adapters: Sequence[State]) -> list[float]:
    """HetLoRA's sparsity weights S_k = ||B_k A_k||_F (Cho et al. 2024: the server averages the
    zero-padded factors with S_k / sum_j S_j). All zero (no client has learned anything): equal weights."""
    s = [lora_norm(a) for a in adapters]
    return s if sum(s) > 0 else [1.0] * len(adapters)


def pruned_rank(adapter: State, r: int, gamma: float, r_min: int = 1) -> int:
    """HetLoRA's local rank self-pruning (Cho et al. 2024; the rule as reconstructed in the
    project's research notes, the paper's exact test could not be read): a rank-r client keeps
    r' = max(r_min, floor(gamma r)) components and drops the trailing r - r' when their update is small
    against the rest, ||B_tail A_tail||_F < (1 - gamma) ||B_head A_head||_F. gamma = 0: no pruning."""
    keep = max(r_min, math.floor(gamma * r))
    if gamma <= 0 or keep >= r:
        return r
    return keep if lora_norm(adapter, keep, r) < (1.0 - gamma) * lora_norm(adapter, 0, keep) else r


def fill_dead_components(adapter: State, init: State, tol: float = 1e-10) -> State:
    """Where both factors of a component are zero it can never learn; restart it from ``init``
    (A from the LoRA init, B = 0), which leaves the adapter's function unchanged."""
    out = dict(adapter)
    for m in modules(adapter):
        a, b = adapter[m + A_SUFFIX], adapter[m + B_SUFFIX]
        dead = (a.abs().amax(dim=1) <= tol) & (b.abs().amax(dim=0) <= tol)
        if bool(dead.any()):
            a = a.clone()
            a[dead] = init[m + A_SUFFIX][dead]
            out[m + A_SUFFIX] = a
    return out


def assign_ranks(resource: Sequence[float], ranks: Sequence[int]) -> list[int]:
    """Devices sorted by ``resource`` fall into len(ranks) near-equal groups; the lowest get ranks[0]."""
    order = np.argsort(np.asarray(resource), kind="stable")
    out = [0] * len(resource)
    for g, idx in enumerate(np.array_split(order, len(ranks))):
        for i in idx:
            out[int(i)] = int(sorted(ranks)[g])
    return out
