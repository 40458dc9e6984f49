"""Clustered FL (Sattler, Müller, Samek, IEEE TNNLS 2020, arXiv 1910.01991) over LoRA adapters.

Clients train their cluster's adapter; the server averages within clusters. After the warm-up,
a cluster whose averaged update is small (||mean dW|| < eps1: near a stationary point of the
joint objective) while some client's update is large (max ||dW_i|| > eps2: the clients disagree)
is split in two by complete-linkage clustering of the cosine similarities of its updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.clustering import bipartition, cosine_matrix, delta, flatten
from edgelam.fl.strategies.base import (
    Population,
    Scheme,
    State,
    Update,
    assigned,
    cluster_adapters,
    cluster_name,
    dispatch_assigned,
    get_prefixed,
    put_prefixed,
    replace_prefixed,
)


def split_criterion(deltas: Sequence[torch.Tensor], weights: Sequence[float], eps1: float, eps2: float) -> tuple[bool, float, float]:
    """(split?, ||weighted mean update||, max ||update||) — CFL's criteria (eqs. 30-31)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    mean_norm = float((torch.stack(list(deltas)) * w[:, None]).sum(0).norm())
    max_norm = max(float(d.norm()) for d in deltas)
    return mean_norm < eps1 and max_norm > eps2, mean_norm, max_norm


@dataclass(frozen=True)
class CFL(Scheme):
    warmup_rounds: int = 1
    eps1: float = 0.4
    eps2: float = 1.6
    max_clusters: int = 8
    name: str = "cfl"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "CFL":
        c = fl.cluster
        return cls(fraction=fl.fraction, warmup_rounds=c.warmup_rounds, eps1=c.eps1, eps2=c.eps2, max_clusters=c.max_clusters)

    def init_state(self, adapter: State, pop: Population) -> State:
        return {"assign": torch.zeros(pop.num_clients, dtype=torch.long)} | put_prefixed(cluster_name(0), adapter)

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        return dispatch_assigned(state, client)

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        groups: dict[str, list[Update]] = {}
        for u in updates:
            groups.setdefault(u.adapter, []).append(u)
        state = {k: v for k, v in state.items() if not k.startswith("diag.")}
        for name, us in sorted(groups.items()):
            start = get_prefixed(state, name)
            new = self.reduce([u.state for u in us], [u.num_samples for u in us])
            state = replace_prefixed(state, name, new)
            if len(us) < 2:
                continue
            deltas = [flatten(delta(u.state, start)) for u in us]
            split, mean_norm, max_norm = split_criterion(deltas, [u.num_samples for u in us], self.eps1, self.eps2)
            # the criterion's norms go to metrics.jsonl ("diagnostics"), to calibrate eps1 and eps2
            state |= {f"diag.{name}.mean_norm": torch.tensor(mean_norm), f"diag.{name}.max_norm": torch.tensor(max_norm)}
            n_clusters = len(cluster_adapters(state))
            if split and round_idx > self.warmup_rounds and n_clusters < self.max_clusters:
                _, second = bipartition(cosine_matrix(deltas))
                newcomers = [us[i] for i in second]
                fresh = cluster_name(n_clusters)
                state = replace_prefixed(state, fresh, self.reduce([u.state for u in newcomers], [u.num_samples for u in newcomers]))
                stay = [us[i] for i in range(len(us)) if i not in second]
                state = replace_prefixed(state, name, self.reduce([u.state for u in stay], [u.num_samples for u in stay]))
                assign = state["assign"].clone()
                assign[[u.client for u in newcomers]] = n_clusters
                state = {**state, "assign": assign}
        return state

    def adapters(self, state: State) -> dict[str, State]:
        return cluster_adapters(state)

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return assigned(state, num_clients)
