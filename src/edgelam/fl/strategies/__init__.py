"""Registry of strategies: name -> class with ``from_config(fl, train, seed)`` and a ``driver``.

``config.STRATEGY_NAMES`` lists the same names (config validates against names, not code); a test
keeps the two equal. ``build_strategy`` adds what every scheme shares (the configured ``reduce``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgelam.config import RunConfig
from edgelam.fl.aggregate import reducer
from edgelam.fl.strategies.cfl import CFL
from edgelam.fl.strategies.fedadam import FedAdam
from edgelam.fl.strategies.fedasync import FedAsync
from edgelam.fl.strategies.fedavg import FedAvg
from edgelam.fl.strategies.fedavgm import FedAvgM
from edgelam.fl.strategies.fedbuff import FedBuff
from edgelam.fl.strategies.fedprox import FedProx
from edgelam.fl.strategies.flexlora import FlexLoRA
from edgelam.fl.strategies.flora import FLoRA
from edgelam.fl.strategies.hetlora import HetLoRA
from edgelam.fl.strategies.hierfavg import HierFAVG
from edgelam.fl.strategies.ifca import IFCA
from edgelam.fl.strategies.rescluster import ResourceClusters
from edgelam.fl.strategies.sfl import SFLV1, SFLV2

STRATEGIES: dict[str, Any] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "ifca": IFCA,
    "cfl": CFL,
    "rescluster": ResourceClusters,
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
    "hierfavg": HierFAVG,
    "hetlora": HetLoRA,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "sfl_v1": SFLV1,
    "sfl_v2": SFLV2,
}

DESCRIPTIONS: dict[str, str] = {
    "fedavg": "FedAvg over LoRA adapters (FedIT), weighted by samples",
    "fedprox": "FedAvg + client proximal term (train.prox_mu)",
    "fedavgm": "FedAvg with server momentum (fl.server_lr, fl.server_momentum)",
    "fedadam": "FedAvg with a server Adam step (fl.server_lr, fl.beta1, fl.beta2, fl.tau)",
    "ifca": "clustered: clients pick the cluster adapter with the lowest loss (fl.cluster.num_clusters, warmup_rounds)",
    "cfl": "clustered: recursive bipartition by update cosine similarity (fl.cluster.eps1, eps2, max_clusters)",
    "rescluster": "clustered: k-means on device speed and round latency (fl.cluster.num_clusters)",
    "fedasync": "asynchronous: mix each arriving update, alpha * s(staleness) (fl.asynchronous.*)",
    "fedbuff": "asynchronous: buffer K staleness-weighted deltas, then step (fl.asynchronous.buffer_size)",
    "hierfavg": "hierarchical: edge aggregation every kappa1 local steps, cloud every kappa2 edge rounds (fl.hier.*)",
    "hetlora": "heterogeneous ranks (fl.rank.ranks, rule); zero-padded factors weighted by ||B_k A_k||_F "
               "(fl.rank.aggregation: norm; samples = zero-padding FedAvg), rank self-pruning (fl.rank.prune_gamma)",
    "flora": "heterogeneous ranks, stacking: exact sum of B_k A_k merged into the base each round",
    "flexlora": "heterogeneous ranks, SVD of the aggregated update redistributed at each client's rank",
    "sfl_v1": "split federated LoRA: one server-side copy per device, averaged each round (split.*, split.schedule.*)",
    "sfl_v2": "split federated LoRA: one shared server-side adapter updated in turn (split.*, split.schedule.*)",
}


def build_strategy(cfg: RunConfig) -> Any:
    """The configured strategy, aggregating with ``fl.aggregator``."""
    strategy = STRATEGIES[cfg.fl.strategy].from_config(cfg.fl, cfg.train, cfg.seed)
    return dataclasses.replace(strategy, reduce=reducer(cfg.fl.aggregator, cfg.fl.byzantine))
