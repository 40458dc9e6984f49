"""Malicious clients for robustness experiments (``fl.attack``): model poisoning on the uplink
(data poisoning: data/poison.py).

A seeded share of the clients replaces what it sends, after (and instead of obeying) the honest
uplink chain, so server-side defences (``fl.norm_bound``, robust ``fl.aggregator``) are what
stands between it and the model:
- sign_flip: start - scale * delta (the update pushed the other way; Blanchard et al. 2017's
  omniscient-style attack without the omniscience);
- scaling: start + scale * delta (model replacement, Bagdasaryan et al., AISTATS 2020: one client
  scales its update to outweigh the average);
- gaussian: start + N(0, scale^2) per coordinate (a random update, Blanchard et al. 2017).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgelam.config_schemes import DATA_ATTACKS, AttackConfig
from edgelam.data.poison import malicious_clients
from edgelam.fl.transforms import Trip, base
from edgelam.store import Purpose, torch_seed_for

State = dict[str, Tensor]


def poison(kind: str, update: State, start: State, scale: float, seed: int) -> State:
    """What a malicious client sends instead of ``update`` (pure function)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(update):
        u, s = update[k].double(), base(start[k], update[k]).double()
        if kind == "sign_flip":
            v = s - scale * (u - s)
        elif kind == "scaling":
            v = s + scale * (u - s)
        elif kind == "gaussian":
            v = s + scale * torch.randn(u.shape, generator=gen, dtype=torch.float64)
        else:
            raise ValueError(f"unknown attack '{kind}'")
        out[k] = v.to(update[k].dtype)
    return out


@dataclass(frozen=True)
class Attack:
    """The uplink transform of the malicious clients (honest clients pass through)."""

    kind: str
    scale: float
    clients: frozenset[int]
    seed: int

    def __call__(self, update: State, start: State, trip: Trip) -> State:
        if trip.client not in self.clients:
            return update
        return poison(self.kind, update, start, self.scale,
                      torch_seed_for(self.seed, Purpose.ATTACK, trip.client, trip.round, trip.seed % 2**62))

    def on_cohort(self, clients: Sequence[int], round_idx: int) -> None:
        return None


def build_attack(cfg: AttackConfig, num_clients: int, seed: int) -> list[Attack]:
    """The uplink side of ``fl.attack``: model poisoning, or the boost (``scale`` != 1) of a data
    poisoner's update (data/poison.py edits its examples)."""
    if cfg.kind in ("none", "tamper") or cfg.fraction == 0 or (cfg.kind in DATA_ATTACKS and cfg.scale == 1):
        return []
    kind = "scaling" if cfg.kind in DATA_ATTACKS else cfg.kind
    return [Attack(kind, cfg.scale, malicious_clients(num_clients, cfg.fraction, seed), seed)]
