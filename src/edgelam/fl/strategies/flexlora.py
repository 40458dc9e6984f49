"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): SVD redistribution for heterogeneous ranks.

The server forms the full update dW = s * sum_k p_k B_k A_k, factors it by SVD, and each client
starts the next round from the best rank-r_k approximation (the first r_k SVD components, padded
to the model's r_max). Components whose factors are both zero are restarted from the LoRA init
(A random, B = 0) so they can learn. Keys other than the LoRA factors are averaged by samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelam.config import FLConfig, RankConfig, TrainConfig
from edgelam.fl.hetero import (
    average_others,
    fill_dead_components,
    mask_rank,
    product_sum,
    rank_of,
    svd_factors,
    truncate,
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
from edgelam.fl.strategies.rankbase import client_rank, init_ranks, upload_truncated


@dataclass(frozen=True)
class FlexLoRA(Scheme):
    ranks: RankConfig = RankConfig()
    name: str = "flexlora"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FlexLoRA":
        return cls(fraction=fl.fraction, ranks=fl.rank)

    def init_state(self, adapter: State, pop: Population) -> State:
        scale = {"scaling": adapter[next(iter(adapter))].new_tensor(pop.lora_scaling)}
        # "global" holds the rank-r_max SVD factors of the last aggregate (at first: the init)
        return init_ranks(adapter, pop, self.ranks) | put_prefixed("init", adapter) | put_prefixed(GLOBAL, adapter) | scale

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        g, r = get_prefixed(state, GLOBAL), client_rank(state, client)
        start = fill_dead_components(mask_rank(g, r), get_prefixed(state, "init"))
        return GLOBAL, start, truncate(start, r)

    def upload(self, client: int, state: State, adapter: State) -> State:
        return upload_truncated(state, client, adapter)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        scaling, samples = float(state["scaling"]), [u.num_samples for u in updates]
        delta = product_sum([u.state for u in updates], samples, scaling)
        factors = svd_factors(delta, rank_of(get_prefixed(state, GLOBAL)), scaling)
        factors |= average_others([u.state for u in updates], samples)
        return {k: v for k, v in state.items() if not k.startswith(GLOBAL + ".")} | put_prefixed(GLOBAL, factors)
