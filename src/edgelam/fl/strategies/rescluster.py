"""Resource/latency clustering (Ni et al., arXiv 2503.21412, clustered FFT by computing resources
and communication latency): k-means on each device's (log FLOP/s, log expected round latency),
fixed at the start; one adapter per cluster, FedAvg inside it. Clients of one cluster finish
rounds at similar times, so a cluster's round is not held back by a much slower device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.clustering import kmeans
from edgelam.fl.strategies.base import (
    Population,
    Scheme,
    State,
    Update,
    assigned,
    average_per_adapter,
    cluster_adapters,
    cluster_name,
    dispatch_assigned,
    put_prefixed,
)


@dataclass(frozen=True)
class ResourceClusters(Scheme):
    num_clusters: int = 2
    seed: int = 0
    name: str = "rescluster"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "ResourceClusters":
        return cls(fraction=fl.fraction, num_clusters=fl.cluster.num_clusters, seed=seed)

    def init_state(self, adapter: State, pop: Population) -> State:
        z = np.array([[math.log10(f), math.log10(t)] for f, t in zip(pop.flops_per_s, pop.latency_s)])
        labels = kmeans(z, self.num_clusters, self.seed)
        state: State = {"assign": torch.tensor(labels, dtype=torch.long)}
        for j in sorted(set(labels)):
            state |= put_prefixed(cluster_name(j), adapter)
        return state

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        return dispatch_assigned(state, client)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        return average_per_adapter(state, updates, self.reduce)

    def adapters(self, state: State) -> dict[str, State]:
        return cluster_adapters(state)

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return assigned(state, num_clients)
