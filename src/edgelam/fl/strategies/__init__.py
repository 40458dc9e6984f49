"""Registry of federated strategies: name -> class with ``from_config(fl, train)``."""

from __future__ import annotations

from typing import Any

from edgelam.fl.strategies.fedadam import FedAdam
from edgelam.fl.strategies.fedavg import FedAvg
from edgelam.fl.strategies.fedavgm import FedAvgM
from edgelam.fl.strategies.fedprox import FedProx

STRATEGIES: dict[str, Any] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}

DESCRIPTIONS: dict[str, str] = {
    "fedavg": "FedAvg over LoRA adapters (FedIT), weighted by samples",
    "fedprox": "FedAvg + client proximal term (train.prox_mu)",
    "fedavgm": "FedAvg with server momentum (fl.server_lr, fl.server_momentum)",
    "fedadam": "FedAvg with a server Adam step (fl.server_lr, fl.beta1, fl.beta2, fl.tau)",
}
