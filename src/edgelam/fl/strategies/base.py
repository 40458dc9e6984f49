"""The strategy interface: a scheme is a small object with a few verbs over one flat server state.

The server state is a flat dict name -> tensor (checkpointed as is). Adapters live in it under a
prefix (``global.``, ``c0.``, ...); optimizer moments and cluster assignments sit beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from edgelam.fl.aggregate import Reduce, weighted_average

State = dict[str, Tensor]
GLOBAL = "global"


class Update(Protocol):
    """What a client returns: its adapter state, how many samples, and which adapter it started from."""

    @property
    def state(self) -> State: ...

    @property
    def num_samples(self) -> int: ...

    @property
    def client(self) -> int: ...

    @property
    def adapter(self) -> str: ...


@dataclass(frozen=True)
class Population:
    """What the server knows of the devices (not their data)."""

    num_clients: int
    flops_per_s: list[float]
    memory_gb: list[float]
    latency_s: list[float]  # expected round latency without fading
    lora_scaling: float = 1.0  # alpha / r of the model's adapter


class Strategy(Protocol):
    name: str
    driver: ClassVar[str]  # which driver runs it: sync | async | hier | split (lifecycle.DRIVERS)
    prox_mu: float  # FedProx coefficient clients apply locally (0 = none)
    reduce: Reduce  # how a set of states becomes one (fl.aggregator)

    def init_state(self, adapter: State, pop: Population) -> State: ...

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]: ...

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        """(name, adapter the client starts from, payload that crosses the downlink)."""
        ...

    def candidates(self, client: int, state: State, round_idx: int) -> dict[str, State] | None:
        """Adapters the client chooses among by its own loss (IFCA), all downloaded and probed on the
        client's side (``fl/executor.py``); None: the client takes what ``dispatch`` gives."""
        ...

    def upload(self, client: int, state: State, adapter: State) -> State:
        """What the client sends back (a rank-r_k client sends only its r_k components)."""
        ...

    def base_delta(self, state: State) -> State:
        """Dense updates merged into the frozen base weights, module name -> (d_out, d_in) (FLoRA)."""
        ...

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State: ...

    def adapters(self, state: State) -> dict[str, State]:
        """The named adapters the run evaluates and saves."""
        ...

    def assignment(self, state: State, num_clients: int) -> list[str]:
        """The adapter name each client belongs to now."""
        ...

    def diagnostics(self, state: State) -> dict[str, float]:
        """Named scalars for the metrics line (empty for most schemes)."""
        ...


@runtime_checkable
class AsyncStrategy(Protocol):
    """A scheme without rounds: the server folds in each update as it arrives."""

    def on_arrival(self, state: State, update: Update, start: State, staleness: int,
                   noise: State | None = None) -> tuple[State, bool]:
        """(new state, whether the global model changed: a new version). ``noise``: central DP's
        N(0, (sigma C)^2) for the server step this arrival may complete (``privacy/dp.py``)."""
        ...

    def dp_weight(self, staleness: int) -> float:
        """How much of one clipped update a server step folds in, relative to its noise (central DP's
        sensitivity, in units of C)."""
        ...


def sample_clients(num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """max(1, round(fraction * K)) clients uniformly without replacement, sorted."""
    m = max(1, int(math.floor(fraction * num_clients + 0.5)))
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def get_prefixed(state: State, prefix: str) -> State:
    """The tensors stored under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def put_prefixed(prefix: str, adapter: State) -> State:
    return {f"{prefix}.{k}": v for k, v in adapter.items()}


def replace_prefixed(state: State, prefix: str, adapter: State) -> State:
    """``state`` with the tensors under ``prefix.`` replaced by ``adapter``."""
    p = prefix + "."
    return {**{k: v for k, v in state.items() if not k.startswith(p)}, **put_prefixed(prefix, adapter)}


@dataclass(frozen=True)
class Scheme:
    """Defaults every strategy shares, each overridable: one global adapter, uniform client
    sampling, plain transfers, a sample-weighted average. Strategies inherit this one level."""

    driver: ClassVar[str] = "sync"
    fraction: float = 1.0
    name: str = "scheme"
    prox_mu: float = 0.0
    reduce: Reduce = weighted_average  # fl.aggregator: how a set of states becomes one (fl/aggregate.py)

    def init_state(self, adapter: State, pop: Population) -> State:
        return put_prefixed(GLOBAL, adapter)

    def select(self, round_idx: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(num_clients, self.fraction, rng)

    def dispatch(self, client: int, state: State, round_idx: int) -> tuple[str, State, State]:
        g = get_prefixed(state, GLOBAL)
        return GLOBAL, g, g

    def candidates(self, client: int, state: State, round_idx: int) -> dict[str, State] | None:
        return None

    def upload(self, client: int, state: State, adapter: State) -> State:
        return adapter

    def aggregate(self, state: State, updates: Sequence[Update], round_idx: int) -> State:
        avg = self.reduce([u.state for u in updates], [u.num_samples for u in updates])
        return replace_prefixed(state, GLOBAL, avg)

    def base_delta(self, state: State) -> State:
        return {}

    def adapters(self, state: State) -> dict[str, State]:
        return {GLOBAL: get_prefixed(state, GLOBAL)}

    def assignment(self, state: State, num_clients: int) -> list[str]:
        return [GLOBAL] * num_clients

    def diagnostics(self, state: State) -> dict[str, float]:
        """Scalars a scheme records under ``diag.`` in its state (e.g. CFL's split norms)."""
        return {k[len("diag."):]: float(v) for k, v in state.items() if k.startswith("diag.")}


def cluster_name(j: int) -> str:
    return f"c{j}"


def assigned(state: State, num_clients: int) -> list[str]:
    """Cluster names from the state's ``assign`` tensor (-1, unassigned, reads as cluster 0)."""
    assign = state.get("assign")
    return [cluster_name(max(0, int(assign[k])) if assign is not None else 0) for k in range(num_clients)]


def with_assignment(state: State, updates: Sequence[Update]) -> State:
    """Record that each update's client now belongs to the cluster it trained."""
    assign = state["assign"].clone()
    for u in updates:
        assign[u.client] = int(u.adapter[1:])
    return {**state, "assign": assign}


def average_per_adapter(state: State, updates: Sequence[Update], reduce: Reduce = weighted_average) -> State:
    """FedAvg inside each adapter (cluster): the updates that started from it, weighted by samples."""
    groups: dict[str, list[Update]] = {}
    for u in updates:
        groups.setdefault(u.adapter, []).append(u)
    for name, us in sorted(groups.items()):
        state = replace_prefixed(state, name, reduce([u.state for u in us], [u.num_samples for u in us]))
    return state


def cluster_adapters(state: State) -> dict[str, State]:
    names = sorted({k.split(".", 1)[0] for k in state if k.startswith("c") and k[1:2].isdigit()}, key=lambda n: int(n[1:]))
    return {n: get_prefixed(state, n) for n in names}


def dispatch_assigned(state: State, client: int) -> tuple[str, State, State]:
    """The adapter of the cluster the client is assigned to."""
    name = cluster_name(int(state["assign"][client]))
    adapter = get_prefixed(state, name)
    return name, adapter, adapter
