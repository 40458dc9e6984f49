"""FedProx (Li et al., MLSys 2020): FedAvg aggregation; clients add (mu/2)||w - w_global||^2 locally."""

from __future__ import annotations

from edgelam.config import ConfigError, FLConfig, TrainConfig
from edgelam.fl.strategies.fedavg import FedAvg


class FedProx:
    """Built as a FedAvg whose clients carry the proximal coefficient ``train.prox_mu``."""

    @staticmethod
    def from_config(fl: FLConfig, train: TrainConfig, seed: int = 0) -> FedAvg:
        if train.prox_mu <= 0:
            raise ConfigError(f"fl.strategy 'fedprox' needs train.prox_mu > 0 (got {train.prox_mu}); e.g. train.prox_mu=0.01")
        return FedAvg(fraction=fl.fraction, name="fedprox", prox_mu=train.prox_mu)
