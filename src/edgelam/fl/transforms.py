"""The uplink: an ordered chain of transforms on each client's update before it is serialized.

A transform sees the trained adapter, the adapter the client started from (so a delta can be
clipped) and the trip (client, round); it returns what goes on the air. ``fl.uplink`` lists them
in order; the strategy's own ``upload`` (rank truncation for heterogeneous ranks) runs last, then
the bytes are measured from the serialized result. ``on_cohort`` is the round-level hook: it
sees the whole cohort of a synchronous round before any update is sent (pairwise masks need it).

Shipped transforms:
- ``clip``: scale the delta (update - start) to L2 norm <= ``fl.clip_norm`` over the whole update
  (Abadi et al. 2016 / McMahan et al. 2018, DP-FedAvg's per-client clipping);
- ``float16``: send the update in half precision (half the bytes; the server computes in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from edgelam.config import FLConfig

State = dict[str, Tensor]


@dataclass(frozen=True)
class Trip:
    client: int
    round: int  # the server version the client read
    seed: int = 0  # the trip's training seed (unique per trip: keys a transform's own randomness)


class Transform(Protocol):
    def __call__(self, update: State, start: State, trip: Trip) -> State: ...

    def on_cohort(self, clients: Sequence[int], round_idx: int) -> None:
        """The synchronous round's cohort, before any of its updates is sent."""
        ...


def base(start: Tensor, update: Tensor) -> Tensor:
    """``start`` cut to ``update``'s shape: a rank-r_k upload (HetLoRA, FlexLoRA) against a wider
    start holds its leading components."""
    return start if start.shape == update.shape else start[tuple(slice(0, d) for d in update.shape)]


def delta_norm(update: State, start: State) -> float:
    """||update - start||_2 over every tensor of the update (one vector)."""
    return math.sqrt(sum(float(((update[k].double() - base(start[k], update[k]).double()) ** 2).sum()) for k in update))


@dataclass(frozen=True)
class Clip:
    max_norm: float

    def __call__(self, update: State, start: State, trip: Trip) -> State:
        norm = delta_norm(update, start)
        if norm <= self.max_norm:
            return update
        scale = self.max_norm / norm
        out = {}
        for k, u in update.items():
            s0 = base(start[k], u).double()
            out[k] = (s0 + scale * (u.double() - s0)).to(u.dtype)
        return out

    def on_cohort(self, clients: Sequence[int], round_idx: int) -> None:
        return None


@dataclass(frozen=True)
class HalfPrecision:
    def __call__(self, update: State, start: State, trip: Trip) -> State:
        return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in update.items()}

    def on_cohort(self, clients: Sequence[int], round_idx: int) -> None:
        return None


def build_chain(fl: FLConfig) -> list[Transform]:
    """``fl.uplink`` as transform objects, in order."""
    makers: dict[str, Callable[[], Transform]] = {"clip": lambda: Clip(fl.clip_norm), "float16": HalfPrecision}
    return [makers[name]() for name in fl.uplink]


def apply_chain(chain: Sequence[Transform], update: State, start: State, trip: Trip) -> State:
    for transform in chain:
        update = transform(update, start, trip)
    return update


def to_server(update: State, like: State) -> State:
    """What the server aggregates: the received tensors in the dtype of its own state."""
    return {k: v.to(like[k].dtype) if k in like and v.dtype != like[k].dtype else v for k, v in update.items()}
