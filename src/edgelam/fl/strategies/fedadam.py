"""FedAdam (Reddi et al., ICLR 2021, arXiv 2003.00295): Adam on the server over pseudo-gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.aggregate import adam_step, pseudo_gradient, weighted_average, zeros_like
from edgelam.fl.strategies.base import State, Update, sample_clients


@dataclass(frozen=True)
class FedAdam:
    fraction: float
    server_lr: float
    beta1: float
    beta2: float
    tau: float
    name: str = "fedadam"
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig) -> "FedAdam":
        return cls(fraction=fl.fraction, server_lr=fl.server_lr, beta1=fl.beta1, beta2=fl.beta2, tau=fl.tau)

    def init_state(self, global_state: State) -> State:
        zeros = zeros_like(global_state)
        return {**{f"m.{k}": t for k, t in zeros.items()}, **{f"v.{k}": t.clone() for k, t in zeros.items()}}

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def aggregate(self, global_state: State, updates: Sequence[Update], server_state: State) -> tuple[State, State]:
        avg = weighted_average([u.state for u in updates], [u.num_samples for u in updates])
        m = {k: server_state[f"m.{k}"] for k in global_state}
        v = {k: server_state[f"v.{k}"] for k in global_state}
        new_global, new_m, new_v = adam_step(global_state, pseudo_gradient(global_state, avg), m, v,
                                             self.server_lr, self.beta1, self.beta2, self.tau)
        return new_global, {**{f"m.{k}": t for k, t in new_m.items()}, **{f"v.{k}": t for k, t in new_v.items()}}
