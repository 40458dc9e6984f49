"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks, zero-padding aggregation.

Client k trains the first r_k components of the global rank-r_max adapter and sends them; the
server zero-pads every update to r_max and averages, weighted by samples. (HetLoRA's rank
self-pruning and sparsity-weighted aggregation are not implemented.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelam.config import FLConfig, RankConfig, TrainConfig
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.hetero import mask_rank, pad, rank_of, truncate
from edgelam.fl.strategies.base import (
    GLOBAL,
    Population,
    Probe,
    Scheme,
    State,
    Update,
    get_prefixed,
    put_prefixed,
    replace_prefixed,
)
from edgelam.fl.strategies.rankbase import client_rank, init_ranks, upload_truncated


@dataclass(frozen=True)
class HetLoRA(Scheme):
    ranks: RankConfig = RankConfig()
    name: str = "hetlora"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "HetLoRA":
        return cls(fraction=fl.fraction, ranks=fl.rank)

    def init_state(self, adapter: State, pop: Population) -> State:
        return init_ranks(adapter, pop, self.ranks) | put_prefixed(GLOBAL, adapter)

    def dispatch(self, client: int, state: State, round_idx: int, probe: Probe) -> tuple[str, State, State]:
        g, r = get_prefixed(state, GLOBAL), client_rank(state, client)
        return GLOBAL, mask_rank(g, r), truncate(g, r)

    def upload(self, client: int, state: State, adapter: State) -> State:
        return upload_truncated(state, client, adapter)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        r_max = rank_of(get_prefixed(state, GLOBAL))
        avg = weighted_average([pad(u.state, r_max) for u in updates], [u.num_samples for u in updates])
        return replace_prefixed(state, GLOBAL, avg)
