"""Strategy-level aggregation of the heterogeneous-rank schemes, by hand on 2 x 2 adapters."""

from dataclasses import dataclass

import pytest
import torch

from edgelam.config import ConfigError, FLConfig, RankConfig, TrainConfig
from edgelam.fl.strategies import STRATEGIES
from edgelam.fl.strategies.base import Population

A, B = "m.lora_A.weight", "m.lora_B.weight"
HEAD = "score.modules_to_save.default.weight"  # a trainable non-LoRA key
# client 0 is the slower: rank 1 of ranks (1, 2); client 1 rank 2. alpha / r = 2
POP = Population(num_clients=2, flops_per_s=[1e9, 2e9], memory_gb=[4.0, 8.0], latency_s=[1.0, 2.0], lora_scaling=2.0)


@dataclass
class _U:
    state: dict
    num_samples: int
    client: int
    adapter: str = "global"


def _strategy(name: str, **rank):
    return STRATEGIES[name].from_config(FLConfig(strategy=name, rank=RankConfig(ranks=(1, 2), **rank)), TrainConfig())


def _init(head: bool = False) -> dict:
    a = {A: torch.tensor([[0.5, 0.5], [0.5, -0.5]]), B: torch.zeros(2, 2)}
    return a | ({HEAD: torch.zeros(1, 2)} if head else {})


# the two clients' uploads (rank 1 and rank 2): B A = [[3, 0], [4, 0]] (norm 5) and diag(9, 12) (norm 15)
def _updates(head: bool = False) -> list[_U]:
    u0 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[3.0], [4.0]])}
    u1 = {A: torch.eye(2), B: torch.tensor([[9.0, 0.0], [0.0, 12.0]])}
    if head:
        u0, u1 = u0 | {HEAD: torch.tensor([[1.0, 2.0]])}, u1 | {HEAD: torch.tensor([[3.0, 6.0]])}
    return [_U(u0, 30, 0), _U(u1, 10, 1)]


def test_hetlora_norm_weighted_aggregate():
    strat = _strategy("hetlora")
    state = strat.init_state(_init(), POP)
    assert state["rank"].tolist() == [1, 2]
    g = strat.adapters(strat.aggregate(state, _updates(), 1))["global"]
    # weights S_k / Z = 5/20, 15/20 (the samples 30 / 10 do not enter)
    assert g[A].tolist() == [[1.0, 0.0], [0.0, 0.75]]
    assert g[B].tolist() == [[7.5, 0.0], [1.0, 9.0]]


def test_hetlora_sample_weighted_aggregate_is_zero_padding_fedavg():
    strat = _strategy("hetlora", aggregation="samples")
    g = strat.adapters(strat.aggregate(strat.init_state(_init(), POP), _updates(), 1))["global"]
    # weights 3/4, 1/4: A = 3/4 [[1, 0], [0, 0]] + 1/4 I; B = 3/4 [[3, 0], [4, 0]] + 1/4 diag(9, 12)
    assert g[A].tolist() == [[1.0, 0.0], [0.0, 0.25]]
    assert g[B].tolist() == [[4.5, 0.0], [3.0, 3.0]]


def test_hetlora_self_pruned_rank_persists():
    strat = _strategy("hetlora", prune_gamma=0.5)
    state = strat.init_state(_init(), POP)
    # client 1 (rank 2) learned almost nothing in its second component: 0.1 < (1 - 0.5) * 9
    trained = {A: torch.eye(2), B: torch.tensor([[9.0, 0.0], [0.0, 0.1]])}
    sent = strat.upload(1, state, trained)
    assert sent[A].shape == (1, 2) and sent[B].shape == (2, 1)  # it sends rank 1
    assert strat.upload(0, state, trained)[A].shape == (1, 2)  # rank 1 is the floor (min of fl.rank.ranks)
    new = strat.aggregate(state, [_U(sent, 10, 1)], 1)
    assert new["rank"].tolist() == [1, 1]
    _, start, payload = strat.dispatch(1, new, 2)
    assert payload[A].shape == (1, 2) and torch.count_nonzero(start[A][1:]) == 0  # next round: rank 1
    assert strat.upload(1, state, {A: torch.eye(2), B: 3 * torch.eye(2)})[A].shape == (2, 2)  # nothing to prune


def test_rank_settings_are_validated():
    with pytest.raises(ConfigError, match="fl.rank.aggregation"):
        RankConfig(aggregation="svd")
    with pytest.raises(ConfigError, match="fl.rank.prune_gamma"):
        RankConfig(prune_gamma=1.0)


def test_flexlora_aggregate_redistributes_the_svd():
    strat = _strategy("flexlora")
    state = strat.init_state(_init(), POP)
    # B A = diag(4, 0) and diag(0, 8), samples 1:1 -> the average product diag(2, 4); scaling 2 cancels
    ups = [_U({A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[4.0], [0.0]])}, 5, 0),
           _U({A: torch.tensor([[0.0, 0.0], [0.0, 1.0]]), B: torch.tensor([[0.0, 0.0], [0.0, 8.0]])}, 5, 1)]
    new = strat.aggregate(state, ups, 1)
    g = strat.adapters(new)["global"]
    assert torch.allclose(g[B] @ g[A], torch.diag(torch.tensor([2.0, 4.0])), atol=1e-6)
    # the rank-1 client gets the top singular component: diag(0, 4)
    _, start, payload = strat.dispatch(0, new, 2)
    assert payload[A].shape == (1, 2)
    assert torch.allclose(payload[B] @ payload[A], torch.diag(torch.tensor([0.0, 4.0])), atol=1e-6)
    assert torch.allclose(start[B] @ start[A], torch.diag(torch.tensor([0.0, 4.0])), atol=1e-6)


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora"])
def test_non_lora_keys_are_averaged_by_samples(name):
    strat = _strategy(name)
    new = strat.aggregate(strat.init_state(_init(head=True), POP), _updates(head=True), 1)
    # (30 * [1, 2] + 10 * [3, 6]) / 40 = [1.5, 3]
    assert strat.adapters(new)["global"][HEAD].tolist() == [[1.5, 3.0]]
    _, start, payload = strat.dispatch(0, new, 2)
    assert start[HEAD].tolist() == [[1.5, 3.0]] and payload[HEAD].tolist() == [[1.5, 3.0]]


def test_fedadam_with_default_settings_does_not_blow_up(repo, tmp_path):
    from edgelam.config_load import load_config
    from edgelam.lifecycle import run

    cfg = load_config(repo / "configs/tiny.yaml", ["fl.strategy=fedadam", "eval.generate=0"])
    assert cfg.fl.server_lr is None  # FedAdam's own 1e-2
    summary = run(cfg, tmp_path / "run")
    assert summary["final_eval_loss"] < summary["first_eval_loss"] + 0.05
