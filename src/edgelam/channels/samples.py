"""A channel-prediction sample and the real / complex views of CSI (shared by the task, the data
builder and the baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CsiSample:
    past: Tensor  # (P, 2S) float32
    future: Tensor  # (F, 2S') float32
    speed_kmh: float
    task: str  # the environment, e.g. "CDL-C"


def complex_to_real(h: Tensor) -> Tensor:
    """(..., S) complex -> (..., 2S) real: real parts, then imaginary parts."""
    return torch.cat([h.real, h.imag], dim=-1).float()


def real_to_complex(x: Tensor) -> Tensor:
    s = x.shape[-1] // 2
    return torch.complex(x[..., :s].float(), x[..., s:].float())


def nmse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """||pred - target||^2 / ||target||^2 per sample (B,)."""
    err = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    return err / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)
