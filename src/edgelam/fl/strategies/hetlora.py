"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks, zero-padding aggregation.

Client k trains the first r_k components of the global rank-r_max adapter and sends them; the
server zero-pads every update to r_max and averages, weighted by samples. (HetLoRA's rank
self-pruning and sparsity-weighted aggregation are not implemented.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelam.config import FLConfig, RankConfig, TrainConfig
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.hetero import mask_rank, pad, rank_of, truncate
from edgelam.fl.strategies.base import GLOBAL, Population, Probe, State, Update, get_prefixed, put_prefixed, replace_prefixed, sample_clients
from edgelam.fl.strategies.rankbase import client_rank, init_ranks, upload_truncated


@dataclass(frozen=True)
class HetLoRA:
    fraction: float
    ranks: RankConfig
    name: str = "hetlora"
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "HetLoRA":
        return cls(fraction=fl.fraction, ranks=fl.rank)

    def init_state(self, adapter: State, pop: Population) -> State:
        return init_ranks(adapter, pop, self.ranks) | put_prefixed(GLOBAL, adapter)

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def dispatch(self, client: int, state: State, round_idx: int, probe: Probe) -> tuple[str, State, State]:
        g, r = get_prefixed(state, GLOBAL), client_rank(state, client)
        return GLOBAL, mask_rank(g, r), truncate(g, r)

    def upload(self, client: int, state: State, adapter: State) -> State:
        return upload_truncated(state, client, adapter)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        r_max = rank_of(get_prefixed(state, GLOBAL))
        avg = weighted_average([pad(u.state, r_max) for u in updates], [u.num_samples for u in updates])
        return replace_prefixed(state, GLOBAL, avg)

    def base_delta(self, state: State) -> State:
        return {}

    def adapters(self, state: State) -> dict[str, State]:
        return {GLOBAL: get_prefixed(state, GLOBAL)}

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return [GLOBAL] * num_clients
