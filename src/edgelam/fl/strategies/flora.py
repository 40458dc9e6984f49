"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking, exact for heterogeneous ranks.

Each round every client starts a fresh LoRA (the run's initial A, B = 0) of its own rank r_k on
top of the base with all earlier rounds merged in. The server stacks the updates,
B_s = [B_1 .. B_K], A_s = [p_1 A_1; ..; p_K A_K], so B_s A_s = sum_k p_k B_k A_k exactly, sends the
stack down (sum r_k components: FLoRA's downlink grows with the number of clients) and every
party merges s * B_s A_s into its base weights. Keys other than the LoRA factors (a trainable head)
are averaged by samples, travel with the stack and replace the init's, so the next round starts
from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelam.config import FLConfig, RankConfig, TrainConfig
from edgelam.fl.hetero import (
    A_SUFFIX,
    B_SUFFIX,
    average_others,
    mask_rank,
    modules,
    product_sum,
    stack,
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
class FLoRA(Scheme):
    ranks: RankConfig = RankConfig()
    name: str = "flora"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "FLoRA":
        return cls(fraction=fl.fraction, ranks=fl.rank)

    def init_state(self, adapter: State, pop: Population) -> State:
        zeros = {m: adapter[m + B_SUFFIX].new_zeros(adapter[m + B_SUFFIX].shape[0], adapter[m + A_SUFFIX].shape[1])
                 for m in modules(adapter)}
        scale = {"scaling": adapter[next(iter(adapter))].new_tensor(pop.lora_scaling)}
        return init_ranks(adapter, pop, self.ranks) | put_prefixed("init", adapter) | put_prefixed("delta", zeros) | scale

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        init, r = get_prefixed(state, "init"), client_rank(state, client)
        stacked = get_prefixed(state, "stack")  # last round's B_s, A_s; the fresh init is known from the seed
        return GLOBAL, mask_rank(init, r), stacked or truncate(init, r)

    def upload(self, client: int, state: State, adapter: State) -> State:
        return upload_truncated(state, client, adapter)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        weights = [u.num_samples for u in updates]
        added = product_sum([u.state for u in updates], weights, float(state["scaling"]))
        delta = get_prefixed(state, "delta")
        stacked = {}
        for m, (b, a) in stack([u.state for u in updates], weights).items():
            stacked[m + ".B"], stacked[m + ".A"] = b, a
        shared = average_others([u.state for u in updates], weights)
        rest = {k: v for k, v in state.items() if not k.startswith(("delta.", "stack."))}
        merged = {m: delta[m] + added[m] for m in delta}
        return rest | put_prefixed("delta", merged) | put_prefixed("stack", stacked | shared) | put_prefixed("init", shared)

    def base_delta(self, state: State) -> State:
        return get_prefixed(state, "delta")

    def adapters(self, state: State) -> dict[str, State]:
        # the learned update lives in the merged base (base_delta); the adapter itself is the fresh init (B = 0)
        return {GLOBAL: get_prefixed(state, "init")}
