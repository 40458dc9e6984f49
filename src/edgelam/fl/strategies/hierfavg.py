"""HierFAVG (Liu, Zhang, Song, Letaief, ICC 2020, arXiv 1905.06641) over LoRA adapters.

Devices train kappa1 local steps and send to their edge server, which averages (weighted by
samples) and sends back; after kappa2 edge aggregations the edges send their models over the
wired backhaul and the cloud averages them, weighted by the edges' samples. One cloud
aggregation is one round; ``fl/hierarchy.py`` runs the two tiers on the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgelam.config import FLConfig, TrainConfig
from edgelam.fl.strategies.base import Scheme


@dataclass(frozen=True)
class HierFAVG(Scheme):
    """FedAvg's selection, dispatch and (cloud) weighted average; the two tier periods (fl.hier.kappa1,
    kappa2) are the hierarchical driver's (``fl/hierarchy.py``)."""

    driver: ClassVar[str] = "hier"
    name: str = "hierfavg"

    @classmethod
    def from_config(cls, fl: FLConfig, train: TrainConfig, seed: int = 0) -> "HierFAVG":
        return cls(fraction=fl.fraction)
