"""FedAvg over LoRA adapters (FedIT, Zhang et al. 2024): average A and B, weighted by samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.strategies.base import State, Update, sample_clients


@dataclass(frozen=True)
class FedAvg:
    fraction: float
    name: str = "fedavg"
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig) -> "FedAvg":
        return cls(fraction=fl.fraction)

    def init_state(self, global_state: State) -> State:
        return {}

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def aggregate(self, global_state: State, updates: Sequence[Update], server_state: State) -> tuple[State, State]:
        return weighted_average([u.state for u in updates], [u.num_samples for u in updates]), server_state
