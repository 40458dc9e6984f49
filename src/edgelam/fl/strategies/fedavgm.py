"""FedAvgM (Hsu et al. 2019, arXiv 1909.06335): server momentum on the averaged pseudo-gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.aggregate import momentum_step, pseudo_gradient, weighted_average, zeros_like
from edgelam.fl.strategies.base import State, Update, sample_clients


@dataclass(frozen=True)
class FedAvgM:
    fraction: float
    server_lr: float
    momentum: float
    name: str = "fedavgm"
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig) -> "FedAvgM":
        return cls(fraction=fl.fraction, server_lr=fl.server_lr, momentum=fl.server_momentum)

    def init_state(self, global_state: State) -> State:
        return {f"velocity.{k}": t for k, t in zeros_like(global_state).items()}

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def aggregate(self, global_state: State, updates: Sequence[Update], server_state: State) -> tuple[State, State]:
        avg = weighted_average([u.state for u in updates], [u.num_samples for u in updates])
        velocity = {k: server_state[f"velocity.{k}"] for k in global_state}
        new_global, new_v = momentum_step(global_state, pseudo_gradient(global_state, avg), velocity,
                                          self.server_lr, self.momentum)
        return new_global, {f"velocity.{k}": t for k, t in new_v.items()}
