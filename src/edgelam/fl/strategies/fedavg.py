"""FedAvg over LoRA adapters (FedIT, Zhang et al. 2024): average A and B, weighted by samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.strategies.base import GLOBAL, Population, Probe, State, Update, get_prefixed, put_prefixed, replace_prefixed, sample_clients


@dataclass(frozen=True)
class FedAvg:
    fraction: float
    name: str = "fedavg"
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedAvg":
        return cls(fraction=fl.fraction)

    def init_state(self, adapter: State, pop: Population) -> State:
        return put_prefixed(GLOBAL, adapter)

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def dispatch(self, client: int, state: State, round_idx: int, probe: Probe) -> tuple[str, State, State]:
        g = get_prefixed(state, GLOBAL)
        return GLOBAL, g, g

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        avg = weighted_average([u.state for u in updates], [u.num_samples for u in updates])
        return replace_prefixed(state, GLOBAL, avg)

    def upload(self, client: int, state: State, adapter: State) -> State:
        return adapter

    def base_delta(self, state: State) -> State:
        return {}

    def adapters(self, state: State) -> dict[str, State]:
        return {GLOBAL: get_prefixed(state, GLOBAL)}

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return [GLOBAL] * num_clients
