"""What the three heterogeneous-rank strategies share: rank per device, truncated transfers."""

from __future__ import annotations

import torch

from edgelam.config import ConfigError, RankConfig
from edgelam.fl.hetero import assign_ranks, rank_of, truncate
from edgelam.fl.strategies.base import Population, State


def init_ranks(adapter: State, pop: Population, cfg: RankConfig) -> State:
    """The per-client rank tensor; the model's own rank must be the largest allowed rank."""
    if rank_of(adapter) != max(cfg.ranks):
        raise ConfigError(f"model.lora.r ({rank_of(adapter)}) must equal the largest of fl.rank.ranks {list(cfg.ranks)}")
    resource = pop.flops_per_s if cfg.rule == "compute" else pop.memory_gb
    return {"rank": torch.tensor(assign_ranks(resource, cfg.ranks), dtype=torch.long)}


def client_rank(state: State, client: int) -> int:
    return int(state["rank"][client])


def upload_truncated(state: State, client: int, adapter: State) -> State:
    """A rank-r_k client sends its first r_k components only."""
    return truncate(adapter, client_rank(state, client))
