"""Split federated LoRA (SFL, Thapa et al. AAAI 2022; over LoRA: Lin et al. 2024, papers.md §1.2).

The model is cut: each device trains the front and back segments (and the task head), the edge
server the middle. SFL-V1 gives every scheduled device its own server-side copy and averages the
copies after the round; SFL-V2 keeps one server-side adapter that the devices' steps update in
turn. The device-side parts are averaged either way (``reduce``, weighted by samples). The split
driver (``split/driver.py``) runs the round: scheduling, the clock, real training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.strategies.base import Scheme, State


@dataclass(frozen=True)
class SFLV1(Scheme):
    driver: ClassVar[str] = "split"
    shared_server: ClassVar[bool] = False  # one server-side copy per device
    name: str = "sfl_v1"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "SFLV1":
        return cls(fraction=fl.fraction)

    def combine(self, device: Sequence[State], server: Sequence[State], weights: Sequence[float]) -> tuple[State, State]:
        """The round's new (device side, server side) from each scheduled device's trained copies."""
        return self.reduce(device, weights), self.reduce(server, weights)


@dataclass(frozen=True)
class SFLV2(SFLV1):
    shared_server: ClassVar[bool] = True  # one server-side adapter, updated by every step in turn
    name: str = "sfl_v2"

    def combine(self, device: Sequence[State], server: Sequence[State], weights: Sequence[float]) -> tuple[State, State]:
        return self.reduce(device, weights), server[0]  # the shared copy already holds every step
