"""Activity recognizers that need no large model: a small CNN and a GRU trained from scratch.

Both map relative CSI amplitude windows (B, W, F) float (``sensing.data.relative``: W frames, F
features) to activity logits (B, C), like ``tasks.sensing.SensingPredictor`` does from tokens:

- ``CNNClassifier``: 1-D convolutions over time with the features as input channels, three
  conv (kernel 5) + ReLU + max-pool (2) blocks, global average pooling over time, a linear head;
- ``GRUClassifier``: a one-layer GRU over the frames, its hidden states averaged over time, a
  linear head.

Inputs are used as they come (no per-window scaling): how much the amplitudes move is what tells
a still room from a moving person. ``fit`` trains either with cross-entropy (Adam, seeded
shuffles), centrally. ``evaluate`` scores any model on a set with ``ActivityRecognition``'s own
sums and metrics (accuracy, macro-F1 over the activities present), so the numbers compare with
the LAM's.

``breathing_rate_fft`` is the classical respiration-rate estimator, no training: the strongest
direction of the window's amplitude variation (its first principal component over time), its
spectrum (Hann window, zero-padded), the peak inside the breathing band.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from edgelam.tasks.sensing import ActivityRecognition


def _check_windows(x: Tensor, features: int) -> None:
    if x.dim() != 3 or x.shape[1] < 1 or x.shape[2] != features or not x.is_floating_point():
        raise ValueError(f"expected float windows of shape (batch, frames >= 1, {features}); "
                         f"got {x.dtype} {tuple(x.shape)}")


class CNNClassifier(nn.Module):
    """(B, W, F) windows -> (B, C) logits: three conv + ReLU + max-pool blocks over time, global
    average pooling, a linear head."""

    def __init__(self, features: int, classes: int, channels: int = 32) -> None:
        super().__init__()
        if features < 1 or classes < 2 or channels < 1:
            raise ValueError(f"need features >= 1, classes >= 2, channels >= 1; got {features}, {classes}, {channels}")
        self.features, self.classes = features, classes
        blocks: list[nn.Module] = []
        width = features
        for _ in range(3):
            blocks += [nn.Conv1d(width, channels, kernel_size=5, padding=2), nn.ReLU(),
                       nn.MaxPool1d(2, ceil_mode=True)]
            width = channels
        self.conv = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, windows: Tensor) -> Tensor:
        _check_windows(windows, self.features)
        hidden = self.conv(windows.float().transpose(1, 2))  # (B, channels, W / 8)
        return self.head(hidden.mean(dim=2))  # type: ignore[no-any-return]


class GRUClassifier(nn.Module):
    """(B, W, F) windows -> (B, C) logits: a GRU over the frames, the mean of its hidden states
    over time, a linear head."""

    def __init__(self, features: int, classes: int, hidden: int = 64) -> None:
        super().__init__()
        if features < 1 or classes < 2 or hidden < 1:
            raise ValueError(f"need features >= 1, classes >= 2, hidden >= 1; got {features}, {classes}, {hidden}")
        self.features, self.classes = features, classes
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, windows: Tensor) -> Tensor:
        _check_windows(windows, self.features)
        states, _ = self.rnn(windows.float())  # (B, W, hidden)
        return self.head(states.mean(dim=1))  # type: ignore[no-any-return]


def _check_set(model: nn.Module, windows: Tensor, labels: Tensor) -> int:
    """The model's number of classes, after checking ``labels`` (N,) integer in range for ``windows``."""
    if windows.dim() != 3 or windows.shape[0] == 0:
        raise ValueError(f"expected windows of shape (N >= 1, frames, features); got {tuple(windows.shape)}")
    if labels.dim() != 1 or labels.shape[0] != windows.shape[0] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"expected integer labels of shape ({windows.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
    with torch.no_grad():
        classes = int(model(windows[:1]).shape[-1])
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels must lie in [0, {classes}) for a model of {classes} classes; "
                         f"got [{int(labels.min())}, {int(labels.max())}]")
    return classes


def fit(model: nn.Module, windows: Tensor, labels: Tensor, epochs: int, batch_size: int = 32, lr: float = 1e-3,
        seed: int = 0) -> list[float]:
    """Train ``model`` on (windows (N, W, F), labels (N,)) with cross-entropy and Adam, the batches
    shuffled by ``seed``; returns the mean loss per epoch and leaves the model in eval mode.
    (The weights' initialisation is the caller's: seed torch before building the model.)"""
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1; got {epochs}, {batch_size}")
    _check_set(model, windows, labels)
    labels = labels.long()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        order, total = torch.randperm(len(windows), generator=gen), 0.0
        for i in range(0, len(windows), batch_size):
            idx = order[i: i + batch_size]
            loss = nn.functional.cross_entropy(model(windows[idx]).float(), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(windows))
    model.eval()
    return losses


def evaluate(model: nn.Module, windows: Tensor, labels: Tensor, classes: Sequence[str] | int,
             batch_size: int = 256) -> dict[str, float]:
    """loss, accuracy and macro-F1 (over the activities present among ``labels``) of ``model`` on
    (windows (N, W, F), labels (N,)), through ``ActivityRecognition.head_sums`` and ``.metrics``;
    ``classes``: the activity names, or their number."""
    names = [str(c) for c in range(classes)] if isinstance(classes, int) else list(classes)
    out = _check_set(model, windows, labels)
    if out != len(names):
        raise ValueError(f"the model gives {out} logits per window, but {len(names)} classes were named")
    task = ActivityRecognition(names, int(windows.shape[1]), int(windows.shape[2]), patch=1, tokenizer="patch")
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            part = task.head_sums(model(windows[i: i + batch_size]), {"labels": labels[i: i + batch_size].long()})
            sums = {k: sums.get(k, 0) + v for k, v in part.items()}
    return task.metrics(sums)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def latency_ms(model: nn.Module, window: Tensor, repeats: int = 20) -> float:
    """Median wall time (ms) of one forward pass on ``window`` (W, F) or a batch (B, W, F), after one
    warm-up pass, on the current thread settings and device (CUDA synchronised around each pass)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    x = window.unsqueeze(0) if window.dim() == 2 else window

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def breathing_rate_fft(windows: np.ndarray, rate_hz: float, band_bpm: tuple[float, float] = (6.0, 30.0),
                       n_fft: int = 4096) -> np.ndarray:
    """(B, W, F) relative amplitude windows captured at ``rate_hz`` -> (B,) breathing rates, bpm:
    the spectral peak in ``band_bpm`` of each window's first principal component over time."""
    x = np.asarray(windows, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 4:
        raise ValueError(f"expected windows of shape (batch, frames >= 4, features); got {x.shape}")
    lo, hi = band_bpm
    if not (0 < lo < hi < 30 * rate_hz):
        raise ValueError(f"band_bpm must be (low, high) with 0 < low < high < {30 * rate_hz:g} (Nyquist at "
                         f"{rate_hz:g} Hz); got {band_bpm}")
    f = np.fft.rfftfreq(max(n_fft, x.shape[1]), 1.0 / rate_hz) * 60.0
    band = (f >= lo) & (f <= hi)
    out = np.empty(len(x))
    for i, w in enumerate(x):
        w = w - w.mean(axis=0)
        u, s, _ = np.linalg.svd(w, full_matrices=False)
        spectrum = np.abs(np.fft.rfft(u[:, 0] * s[0] * np.hanning(len(w)), len(f) * 2 - 2))
        out[i] = f[band][np.argmax(spectrum[band])]
    return out
