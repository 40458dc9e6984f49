"""Aggregation rules against hand-computed values."""

import pytest
import torch

from edgelam.fl import aggregate
from edgelam.fl.strategies import STRATEGIES
from edgelam.fl.strategies.base import Population, sample_clients
from edgelam.config import FLConfig, TrainConfig, ConfigError
from edgelam.store import rng_for


def test_weighted_average_by_samples():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([4.0, 8.0])}
    # weights 1 and 3: (1*[1,2] + 3*[4,8]) / 4 = [13/4, 26/4]
    out = aggregate.weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))


def test_weighted_average_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="same keys"):
        aggregate.weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])


def test_fedavgm_two_steps():
    x = {"w": torch.tensor([1.0])}
    avg = {"w": torch.tensor([0.5])}  # Delta = 0.5
    v0 = {"w": torch.tensor([0.0])}
    x1, v1 = aggregate.momentum_step(x, aggregate.pseudo_gradient(x, avg), v0, lr=1.0, beta=0.9)
    assert float(v1["w"]) == pytest.approx(0.5) and float(x1["w"]) == pytest.approx(0.5)
    # second step, Delta = 0.5 - 0.25 = 0.25: v = 0.9*0.5 + 0.25 = 0.7; x = 0.5 - 0.7 = -0.2
    x2, v2 = aggregate.momentum_step(x1, aggregate.pseudo_gradient(x1, {"w": torch.tensor([0.25])}), v1, 1.0, 0.9)
    assert float(v2["w"]) == pytest.approx(0.7) and float(x2["w"]) == pytest.approx(-0.2)


def test_fedadam_step():
    x = {"w": torch.tensor([1.0])}
    delta = aggregate.pseudo_gradient(x, {"w": torch.tensor([0.8])})  # 0.2
    z = {"w": torch.tensor([0.0])}
    x1, m1, v1 = aggregate.adam_step(x, delta, z, z, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.1 * (-0.2) = -0.02; v = 0.01 * 0.04 = 4e-4; x = 1 + 0.1 * (-0.02) / (0.02 + 0.001) = 0.904762
    assert float(m1["w"]) == pytest.approx(-0.02)
    assert float(v1["w"]) == pytest.approx(4e-4)
    assert float(x1["w"]) == pytest.approx(1 - 0.002 / 0.021, rel=1e-5)


def test_sample_clients_fraction():
    rng = rng_for(0, 1)
    picked = sample_clients(10, 0.3, rng)
    assert len(picked) == 3 and len(set(picked)) == 3 and all(0 <= k < 10 for k in picked)
    assert sample_clients(10, 0.01, rng_for(0, 2)) != []  # at least one


class _U:
    def __init__(self, w: float, n: int, client: int = 0, adapter: str = "global"):
        self.state, self.num_samples, self.client, self.adapter = {"w": torch.tensor([w])}, n, client, adapter


POP = Population(num_clients=2, flops_per_s=[1e9, 2e9], memory_gb=[4.0, 8.0], latency_s=[1.0, 2.0])


# first step from 0 towards the clients' mean 2 (Delta = -2) with the default settings: FedAvg / FedProx
# take the mean; FedAvgM v = -2, x = 0 - 1.0 * v = 2; FedAdam m = 0.1 * 2 = 0.2, v = 0.01 * 4 = 0.04,
# x = 0.01 * 0.2 / (sqrt(0.04) + 1e-3) = 0.00995
@pytest.mark.parametrize("name, want", [("fedavg", 2.0), ("fedprox", 2.0), ("fedavgm", 2.0), ("fedadam", 0.002 / 0.201)])
def test_every_global_strategy_aggregates_towards_clients(name, want):
    train = TrainConfig(prox_mu=0.1)
    strat = STRATEGIES[name].from_config(FLConfig(strategy=name), train)
    state = strat.init_state({"w": torch.tensor([0.0])}, POP)
    assert set(strat.adapters(state)) == {"global"}
    new = strat.aggregate(state, [_U(1.0, 1), _U(3.0, 1, client=1)], 1)
    assert float(strat.adapters(new)["global"]["w"]) == pytest.approx(want, rel=1e-6)
    name_, start, payload = strat.dispatch(0, new, 2)
    assert name_ == "global" and torch.equal(start["w"], strat.adapters(new)["global"]["w"]) and payload is start


def test_fedprox_needs_mu():
    with pytest.raises(ConfigError, match="train.prox_mu"):
        STRATEGIES["fedprox"].from_config(FLConfig(strategy="fedprox"), TrainConfig())


def test_fedadam_default_step_is_about_a_fedavg_step():
    # fl.server_lr unset: FedAdam's own 1e-2. A LoRA-sized pseudo-gradient of 1e-3 moves each parameter
    # 1e-2 * 1e-4 / (1e-4 + 1e-3) = 9.1e-4, about the FedAvg step 1e-3 (server_lr 1.0 would move it 0.09)
    strat = STRATEGIES["fedadam"].from_config(FLConfig(strategy="fedadam"), TrainConfig())
    state = strat.init_state({"w": torch.tensor([0.0])}, POP)
    new = strat.aggregate(state, [_U(1e-3, 1)], 1)
    assert float(strat.adapters(new)["global"]["w"]) == pytest.approx(1e-2 * 1e-4 / 1.1e-3, rel=1e-5)
    assert STRATEGIES["fedadam"].from_config(FLConfig(strategy="fedadam", server_lr=0.5), TrainConfig()).server_lr == 0.5
    assert STRATEGIES["fedavgm"].from_config(FLConfig(strategy="fedavgm"), TrainConfig()).server_lr == 1.0
