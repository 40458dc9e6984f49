"""IFCA (Ghosh et al., NeurIPS 2020, arXiv 2006.04088) over LoRA adapters.

Each selected client evaluates every cluster adapter on its own data and trains the one with the
lowest loss; the server averages each cluster's updates. LoRA starts with B = 0, so K random
inits would be the same function and every client would tie: the first ``warmup_rounds`` rounds
train from the common init and the server seeds the K clusters by k-means over the warm-up
updates (cosine geometry: updates normalised to unit length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.clustering import delta, flatten, kmeans
from edgelam.fl.strategies.base import (
    Population,
    Scheme,
    State,
    Update,
    assigned,
    average_per_adapter,
    cluster_adapters,
    cluster_name,
    get_prefixed,
    put_prefixed,
    replace_prefixed,
    with_assignment,
)


@dataclass(frozen=True)
class IFCA(Scheme):
    num_clusters: int = 2
    warmup_rounds: int = 1
    seed: int = 0
    name: str = "ifca"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "IFCA":
        return cls(fraction=fl.fraction, num_clusters=fl.cluster.num_clusters, warmup_rounds=fl.cluster.warmup_rounds, seed=seed)

    def init_state(self, adapter: State, pop: Population) -> State:
        state: State = {"assign": torch.full((pop.num_clients,), -1, dtype=torch.long)}
        for j in range(self.num_clusters):
            state |= put_prefixed(cluster_name(j), adapter)
        return state

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        first = get_prefixed(state, cluster_name(0))  # warm-up: everyone trains the common init
        return cluster_name(0), first, first

    def candidates(self, client: int, state: State, round_idx: int) -> dict[str, State] | None:
        """After warm-up the client downloads every cluster and trains the one with its lowest loss
        (ties go to the lower cluster id); the executor probes, on the client's side."""
        return None if round_idx <= self.warmup_rounds else cluster_adapters(state)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        if round_idx < self.warmup_rounds:
            return average_per_adapter(state, updates, self.reduce)  # all trained cluster 0, the common init
        if round_idx == self.warmup_rounds:
            return self._seed_clusters(state, updates)
        return with_assignment(average_per_adapter(state, updates, self.reduce), updates)

    def _seed_clusters(self, state: State, updates: Sequence[Update]) -> State:
        init = get_prefixed(state, cluster_name(0))
        vecs = [flatten(delta(u.state, init)) for u in updates]
        unit = np.stack([(v / v.norm().clamp_min(1e-12)).numpy() for v in vecs])
        labels = kmeans(unit, self.num_clusters, self.seed)
        assign = state["assign"].clone()
        for j in range(self.num_clusters):
            members = [u for u, lab in zip(updates, labels) if lab == j]
            if members:
                avg = self.reduce([u.state for u in members], [u.num_samples for u in members])
                state = replace_prefixed(state, cluster_name(j), avg)
            for u in members:
                assign[u.client] = j
        return {**state, "assign": assign}

    def adapters(self, state: State) -> dict[str, State]:
        return cluster_adapters(state)

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return assigned(state, num_clients)
