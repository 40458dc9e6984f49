"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639) over LoRA adapters, on the event clock.

Each arriving client delta (model read - model trained) is weighted by s(staleness) and added to
a buffer; after K arrivals the server steps x <- x - eta_g * buffer / K and empties the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from edgelam.config import AsyncConfig, FLConfig, TrainConfig
from edgelam.fl.aggregate import buffered_step, staleness_weight, zeros_like
from edgelam.privacy.dp import add_noise
from edgelam.fl.strategies.base import (
    GLOBAL,
    Population,
    Scheme,
    State,
    Update,
    get_prefixed,
    put_prefixed,
    replace_prefixed,
)


@dataclass(frozen=True)
class FedBuff(Scheme):
    settings: AsyncConfig = AsyncConfig()
    driver: ClassVar[str] = "async"
    name: str = "fedbuff"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FedBuff":
        return cls(fraction=fl.fraction, settings=fl.asynchronous, prox_mu=train.prox_mu)

    def init_state(self, adapter: State, pop: Population) -> State:
        return put_prefixed(GLOBAL, adapter) | put_prefixed("buffer", zeros_like(adapter)) | {"buffered": torch.tensor(0)}

    def on_arrival(self, state: State, update: Update, start: State, staleness: int,
                   noise: State | None = None) -> tuple[State, bool]:
        """Central DP: the noise joins the buffer sum at the step, unweighted by staleness."""
        w = self.dp_weight(staleness)
        buffer = {k: v + w * (start[k] - update.state[k]) for k, v in get_prefixed(state, "buffer").items()}
        count = int(state["buffered"]) + 1
        s = self.settings
        if count < s.buffer_size:
            return replace_prefixed(state, "buffer", buffer) | {"buffered": torch.tensor(count)}, False
        if noise is not None:
            buffer = add_noise(buffer, noise)
        new_global = buffered_step(get_prefixed(state, GLOBAL), buffer, count, s.server_lr)
        state = replace_prefixed(replace_prefixed(state, GLOBAL, new_global), "buffer", zeros_like(buffer))
        return state | {"buffered": torch.tensor(0)}, True

    def dp_weight(self, staleness: int) -> float:
        s = self.settings
        return staleness_weight(s.staleness, staleness, s.a, s.b)
