"""Beam prediction: metrics, a user split and plain baselines to beat.

A predictor gives each user a score per beam (N, B); the metrics rank beams by score. Gains
are |w_i^H h|^2 from ``deepmimo.beam_gains``; the oracle beam is the argmax of a user's gains.
Baselines: k nearest neighbours on features, a small MLP trained with cross-entropy (the
usual deep-learning beam predictor, e.g. Alkhateeb et al., "Deep learning coordinated
beamforming", IEEE Access 2018), and, for tracks, repeating the last beam.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn


def _check_scores(scores: np.ndarray, y: np.ndarray) -> None:
    if scores.ndim != 2 or y.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, B) and labels (N,), got {scores.shape} and {y.shape}")


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    """Share of users whose true beam ``y`` is among their ``k`` highest-scored beams (ties go
    to the lower beam index)."""
    _check_scores(scores, y)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of beams ({scores.shape[1]})")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def _picked(pred: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(oracle gain, gain of the predicted beam), each (N,)."""
    _check_scores(gains, pred)
    if pred.min() < 0 or pred.max() >= gains.shape[1]:
        raise ValueError(f"predicted beams must lie in 0..{gains.shape[1] - 1}")
    return gains.max(axis=1), gains[np.arange(len(pred)), pred]


def user_gain_loss_db(pred: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """(N,) 10 log10(gain[oracle] / gain[pred]) per user, >= 0; inf where the beam has no gain."""
    best, got = _picked(pred, gains)
    with np.errstate(divide="ignore"):
        return np.asarray(10 * np.log10(best / got))


def gain_loss_db(pred: np.ndarray, gains: np.ndarray) -> float:
    """Mean over users of the per-user loss in dB (the mean of dB: each user counts the same,
    whatever its path loss)."""
    return float(np.mean(user_gain_loss_db(pred, gains)))


def gain_loss_db_of_means(pred: np.ndarray, gains: np.ndarray) -> float:
    """10 log10(mean oracle gain / mean predicted gain) (the dB of means: dominated by the
    strongest users, as a sum rate at high SNR would be)."""
    best, got = _picked(pred, gains)
    return float(10 * np.log10(best.mean() / got.mean()))


def split_users(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted user indices, a random split fixed by ``seed``; both non-empty."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    n_test = round(n * test_fraction)
    if not 0 < n_test < n:
        raise ValueError(f"{n} users cannot be split {1 - test_fraction:.0%}/{test_fraction:.0%} "
                         f"with both parts non-empty")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


class NearestNeighbour:
    """k-NN beam lookup: a beam's score is the number of the k nearest training users (Euclidean,
    on features) whose best beam it is, plus 1 / (2 + distance to the nearest of them), so top-k
    ranks by votes, then by closeness; beams no neighbour has score 0."""

    def __init__(self, n_beams: int, k: int = 5) -> None:
        if k < 1:
            raise ValueError(f"k={k}: a neighbour lookup needs k >= 1")
        self.n_beams, self.k = n_beams, k
        self._tree: cKDTree | None = None
        self._y = np.zeros(0, dtype=np.int64)

    def fit(self, x: np.ndarray, y: np.ndarray) -> NearestNeighbour:
        if len(x) < self.k:
            raise ValueError(f"{len(x)} training users are fewer than k={self.k} neighbours")
        self._tree, self._y = cKDTree(x), np.asarray(y, dtype=np.int64)
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        if self._tree is None:
            raise RuntimeError("NearestNeighbour.scores before fit")
        dist, idx = self._tree.query(x, k=self.k)  # (N, k)
        dist, idx = dist.reshape(len(x), -1), idx.reshape(len(x), -1)
        where = (np.repeat(np.arange(len(x)), dist.shape[1]), self._y[idx].ravel())
        votes, closeness = np.zeros((len(x), self.n_beams)), np.zeros((len(x), self.n_beams))
        np.add.at(votes, where, 1.0)
        np.maximum.at(closeness, where, 1 / (2 + dist.ravel()))  # in (0, 1/2]: never outweighs a vote
        return votes + closeness


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one CPU thread, restored after: on matrices this small, more threads only add
    synchronisation, and they stall badly when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MLPBeam:
    """A small MLP (features -> hidden -> hidden -> beam logits, ReLU) trained with cross-entropy
    and Adam on CPU, full batch unless ``batch_size`` is set. Deterministic by ``seed``; torch's
    global RNG and thread count are left as they were."""

    def __init__(self, n_beams: int, hidden: int = 128) -> None:
        self.n_beams, self.hidden = n_beams, hidden
        self._net: nn.Sequential | None = None

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 500, lr: float = 1e-2, seed: int = 0,
            batch_size: int | None = None) -> MLPBeam:
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
        with torch.random.fork_rng(devices=[]), _one_thread():
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(xt.shape[1], self.hidden), nn.ReLU(),
                                nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                                nn.Linear(self.hidden, self.n_beams))
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            for _ in range(epochs):
                for batch in torch.randperm(len(xt)).split(batch_size or len(xt)):
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
                    opt.step()
        self._net = net.eval()
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N, B) logits."""
        if self._net is None:
            raise RuntimeError("MLPBeam.scores before fit")
        with torch.no_grad(), _one_thread():
            return self._net(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)


class RepeatLast:
    """Next beam = the last one of the track; score -|b - last| so the neighbouring beams (the
    codebook is ordered in sin-space) come next in a top-k."""

    def __init__(self, n_beams: int) -> None:
        self.n_beams = n_beams

    def scores(self, past_beams: np.ndarray) -> np.ndarray:
        """(M, B) scores from past beams (M, T), oldest first."""
        last = np.asarray(past_beams)[:, -1]
        return -np.abs(np.arange(self.n_beams)[None, :] - last[:, None]).astype(np.float64)
