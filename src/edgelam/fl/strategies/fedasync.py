"""FedAsync (Xie, Koyejo, Gupta 2019, arXiv 1903.03934) over LoRA adapters, on the event clock.

Every active device trains at its own speed with no barrier; each arriving update is mixed in at
once: x <- (1 - a_t) x + a_t x_new with a_t = alpha * s(staleness), staleness = the number of
versions the server advanced since the device read the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgelam.config import AsyncConfig, FLConfig, TrainConfig
from edgelam.fl.aggregate import mix, staleness_weight
from edgelam.privacy.dp import add_noise
from edgelam.fl.strategies.base import (
    GLOBAL,
    Scheme,
    State,
    Update,
    get_prefixed,
    replace_prefixed,
)


@dataclass(frozen=True)
class FedAsync(Scheme):
    """FedAvg's selection (the active devices) and dispatch; aggregation on each arrival."""

    settings: AsyncConfig = AsyncConfig()
    driver: ClassVar[str] = "async"
    name: str = "fedasync"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedAsync":
        return cls(fraction=fl.fraction, settings=fl.asynchronous, prox_mu=train.prox_mu)

    def on_arrival(self, state: State, update: Update, start: State, staleness: int,
                   noise: State | None = None) -> tuple[State, bool]:
        """Central DP: the noise joins x_new before mixing, so update and noise scale together."""
        s = self.settings
        alpha_t = s.alpha * staleness_weight(s.staleness, staleness, s.a, s.b)
        x_new = add_noise(update.state, noise) if noise is not None else update.state
        return replace_prefixed(state, GLOBAL, mix(get_prefixed(state, GLOBAL), x_new, alpha_t)), True

    def dp_weight(self, staleness: int) -> float:
        return 1.0  # alpha s(tau) scales the update and its noise alike
