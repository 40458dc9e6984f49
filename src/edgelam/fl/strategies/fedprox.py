"""FedProx (Li et al., MLSys 2020): FedAvg aggregation; clients add (mu/2)||w - w_global||^2 locally."""

from __future__ import annotations

from dataclasses import dataclass

from edgelam.config import ConfigError, FLConfig, TrainConfig
from edgelam.fl.strategies.base import Scheme


@dataclass(frozen=True)
class FedProx(Scheme):
    """FedAvg whose clients carry the proximal coefficient ``train.prox_mu`` (> 0)."""

    name: str = "fedprox"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedProx":
        if train.prox_mu <= 0:
            raise ConfigError(f"fl.strategy 'fedprox' needs train.prox_mu > 0 (got {train.prox_mu}); e.g. train.prox_mu=0.01")
        return cls(fraction=fl.fraction, prox_mu=train.prox_mu)
