"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks, zero-padding aggregation.

Client k trains the first r_k components of the global rank-r_max adapter and sends them; the
server zero-pads every update to r_max and averages the factors A and B apart. ``fl.rank.aggregation``:
norm (the paper's sparsity-weighted aggregation, weights S_k = ||B_k A_k||_F / sum_j S_j) or samples
(sample-weighted, i.e. zero-padding FedAvg). Keys other than the LoRA factors are averaged by samples.
With ``fl.rank.prune_gamma`` > 0 a client self-prunes: it drops its trailing components when they
are small (fl/hetero.py ``pruned_rank``) and sends the rest; the server keeps its new rank for the
rounds after. HetLoRA's local regulariser on the trailing components is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelam.config import FLConfig, RankConfig, TrainConfig
from edgelam.fl.aggregate import weighted_average
from edgelam.fl.hetero import average_others, is_lora, mask_rank, norm_weights, pad, pruned_rank, rank_of, truncate
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
from edgelam.fl.strategies.rankbase import client_rank, init_ranks


@dataclass(frozen=True)
class HetLoRA(Scheme):
    ranks: RankConfig = RankConfig()
    name: str = "hetlora"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "HetLoRA":
        return cls(fraction=fl.fraction, ranks=fl.rank)

    def init_state(self, adapter: State, pop: Population) -> State:
        return init_ranks(adapter, pop, self.ranks) | put_prefixed(GLOBAL, adapter)

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        g, r = get_prefixed(state, GLOBAL), client_rank(state, client)
        return GLOBAL, mask_rank(g, r), truncate(g, r)

    def upload(self, client: int, state: State, adapter: State) -> State:
        """The client's first r_k components, fewer if it self-prunes this round."""
        r = client_rank(state, client)
        return truncate(adapter, pruned_rank(truncate(adapter, r), r, self.ranks.prune_gamma, min(self.ranks.ranks)))

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        r_max = rank_of(get_prefixed(state, GLOBAL))
        padded = [pad(u.state, r_max) for u in updates]
        samples = [u.num_samples for u in updates]
        weights = norm_weights([u.state for u in updates]) if self.ranks.aggregation == "norm" else samples
        factors = weighted_average([{k: v for k, v in p.items() if is_lora(k)} for p in padded], weights)
        rank = state["rank"].clone()
        for u in updates:  # a self-pruned client keeps its smaller rank (what it sent)
            rank[u.client] = rank_of(u.state)
        return replace_prefixed(state, GLOBAL, factors | average_others(padded, samples)) | {"rank": rank}
