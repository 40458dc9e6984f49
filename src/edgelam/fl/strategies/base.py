"""The strategy interface: a scheme is a small object with a few verbs and explicit server state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from torch import Tensor

State = dict[str, Tensor]


class Update(Protocol):
    """What a client returns: its adapter state and how many samples it trained on."""

    @property
    def state(self) -> State: ...

    @property
    def num_samples(self) -> int: ...


class Strategy(Protocol):
    name: str
    prox_mu: float  # FedProx coefficient clients apply locally (0 = none)

    def init_state(self, global_state: State) -> State:
        """Server optimizer state (flat name -> tensor, saved in checkpoints)."""
        ...

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]: ...

    def aggregate(self, global_state: State, updates: Sequence[Update], server_state: State) -> tuple[State, State]: ...


def sample_clients(num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """max(1, round(fraction * K)) clients uniformly without replacement, sorted."""
    m = max(1, int(math.floor(fraction * num_clients + 0.5)))
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))
