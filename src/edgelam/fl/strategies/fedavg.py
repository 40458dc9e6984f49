"""FedAvg over LoRA adapters (FedIT, Zhang et al. 2024): average A and B, weighted by samples."""

from __future__ import annotations

from dataclasses import dataclass

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.strategies.base import Scheme


@dataclass(frozen=True)
class FedAvg(Scheme):
    """The defaults of ``Scheme`` are FedAvg: sample clients, average their adapters by samples."""

    name: str = "fedavg"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedAvg":
        return cls(fraction=fl.fraction)
