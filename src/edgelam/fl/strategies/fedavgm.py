"""FedAvgM (Hsu et al. 2019, arXiv 1909.06335): server momentum on the averaged pseudo-gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.aggregate import (
    momentum_step,
    pseudo_gradient,
    weighted_average,
    zeros_like,
)
from edgelam.fl.strategies.base import (
    GLOBAL,
    Population,
    Scheme,
    State,
    Update,
    get_prefixed,
    put_prefixed,
)


@dataclass(frozen=True)
class FedAvgM(Scheme):
    """FedAvg's selection and dispatch; the server steps with momentum instead of taking the average."""

    server_lr: float = 1.0  # used when fl.server_lr is null (the default); with momentum 0 a FedAvg step
    momentum: float = 0.9
    name: str = "fedavgm"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedAvgM":
        lr = cls.server_lr if fl.server_lr is None else fl.server_lr
        return cls(fraction=fl.fraction, server_lr=lr, momentum=fl.server_momentum)

    def init_state(self, adapter: State, pop: Population) -> State:
        return put_prefixed(GLOBAL, adapter) | put_prefixed("velocity", zeros_like(adapter))

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        g = get_prefixed(state, GLOBAL)
        avg = weighted_average([u.state for u in updates], [u.num_samples for u in updates])
        new_g, new_v = momentum_step(g, pseudo_gradient(g, avg), get_prefixed(state, "velocity"), self.server_lr, self.momentum)
        return put_prefixed(GLOBAL, new_g) | put_prefixed("velocity", new_v)
