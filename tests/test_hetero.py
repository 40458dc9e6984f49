"""Heterogeneous-rank LoRA: the aggregation rules by hand, exactness of stacking, runs end to end."""

import subprocess
import sys

import pytest
import torch

from edgelam.config import DataConfig, LoraConfig as LoraSettings, TrainConfig
from edgelam.data.build import build_federated_data
from edgelam.fl.client import local_train
from edgelam.fl.hetero import (assign_ranks, average_others, fill_dead_components, mask_rank, norm_weights, pad,
                              product_sum, pruned_rank, stack, svd_factors, truncate)
from edgelam.models.flops import flop_model
from edgelam.models.load import tiny_model
from edgelam.models.lora import attach_lora, get_adapter_state
from edgelam.store import read_jsonl

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _adapter(r: int, seed: int, d_in: int = 5, d_out: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, d_in, generator=g, dtype=torch.float64), B: torch.randn(d_out, r, generator=g, dtype=torch.float64)}


def test_stacking_is_the_exact_weighted_sum_of_products():
    adapters = [_adapter(2, 0), _adapter(4, 1), _adapter(8, 2)]
    weights = [10, 30, 60]
    (bs, as_), = stack(adapters, weights).values()
    assert bs.shape == (3, 14) and as_.shape == (14, 5)  # sum of ranks
    expected = sum(w / 100 * (a[B] @ a[A]) for a, w in zip(adapters, weights))
    assert torch.allclose(bs @ as_, expected, atol=1e-12)
    assert torch.allclose(product_sum(adapters, weights, scaling=2.0)["m"], 2.0 * expected, atol=1e-12)


def test_zero_padding_average_by_hand():
    a2 = {A: torch.ones(2, 1), B: torch.ones(1, 2)}
    a4 = {A: 3 * torch.ones(4, 1), B: 3 * torch.ones(1, 4)}
    padded = [pad(a2, 4), pad(a4, 4)]
    assert padded[0][A].flatten().tolist() == [1, 1, 0, 0]
    avg = {k: (padded[0][k] + padded[1][k]) / 2 for k in padded[0]}
    # components 0-1: (1 + 3) / 2 = 2; components 2-3: (0 + 3) / 2 = 1.5
    assert avg[A].flatten().tolist() == [2, 2, 1.5, 1.5]
    assert truncate(a4, 2)[B].shape == (1, 2)
    assert torch.equal(mask_rank(a4, 1)[A].flatten(), torch.tensor([3.0, 0, 0, 0]))


def test_norm_weights_by_hand():
    # client 0, rank 1: B A = [[3, 0], [4, 0]], ||.||_F = 5; client 1, rank 2: B A = diag(9, 12), ||.||_F = 15
    a1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[3.0], [4.0]])}
    a2 = {A: torch.eye(2), B: torch.tensor([[9.0, 0.0], [0.0, 12.0]])}
    assert norm_weights([a1, a2]) == pytest.approx([5.0, 15.0])
    # HetLoRA: A = 1/4 pad(A_1) + 3/4 A_2 = [[1, 0], [0, 0.75]]; B = 1/4 [[3, 0], [4, 0]] + 3/4 diag(9, 12)
    avg = {k: 0.25 * pad(a1, 2)[k] + 0.75 * a2[k] for k in a2}
    assert avg[A].tolist() == [[1.0, 0.0], [0.0, 0.75]] and avg[B].tolist() == [[7.5, 0.0], [1.0, 9.0]]
    assert norm_weights([{A: torch.zeros(1, 2), B: torch.zeros(2, 1)}] * 2) == [1.0, 1.0]  # nothing learned: equal


def test_rank_self_pruning_by_hand():
    # rank 4, one module, A = I: component j of B A is B's column j. gamma 0.5 keeps floor(2) = 2 components
    # when ||tail||_F < (1 - 0.5) ||head||_F = 0.5 * ||(4, 3)|| = 2.5
    def adapter(cols):
        return {A: torch.eye(4), B: torch.diag(torch.tensor(cols))}

    assert pruned_rank(adapter([4.0, 3.0, 0.1, 0.2]), 4, gamma=0.5) == 2  # tail sqrt(0.05) = 0.22 < 2.5
    assert pruned_rank(adapter([4.0, 3.0, 3.0, 0.0]), 4, gamma=0.5) == 4  # tail 3 >= 2.5: kept
    assert pruned_rank(adapter([4.0, 3.0, 0.0, 1.0]), 4, gamma=0.75) == 3  # keeps floor(3); tail 1 < 0.25 * 5
    assert pruned_rank(adapter([4.0, 3.0, 0.1, 0.2]), 4, gamma=0.5, r_min=3) == 3  # never below r_min: drops one
    assert pruned_rank(adapter([4.0, 3.0, 0.1, 0.2]), 4, gamma=0.0) == 4  # off


def test_non_lora_keys_pass_through_the_rank_helpers():
    head = "classifier.modules_to_save.default.weight"
    a = _adapter(4, 0) | {head: torch.tensor([[1.0, 2.0]])}
    for out in (truncate(a, 2), pad(truncate(a, 2), 4), mask_rank(a, 1), fill_dead_components(a, a)):
        assert torch.equal(out[head], a[head])
    assert truncate(a, 2)[A].shape == (2, 5) and pad(truncate(a, 2), 4)[B].shape == (3, 4)
    assert list(stack([a, a], [1, 1])) == ["m"]  # stacking concerns LoRA modules only
    b = _adapter(2, 1) | {head: torch.tensor([[3.0, 6.0]])}
    assert average_others([a, b], [1, 3])[head].tolist() == [[2.5, 5.0]]  # (1 * [1, 2] + 3 * [3, 6]) / 4
    assert average_others([_adapter(2, 0)], [1]) == {}


def test_svd_factors_best_low_rank():
    g = torch.Generator().manual_seed(0)
    delta = {"m": torch.randn(6, 7, generator=g, dtype=torch.float64)}
    f = svd_factors(delta, r_max=6, scaling=0.5)
    assert torch.allclose(0.5 * f[B] @ f[A], delta["m"], atol=1e-10)  # full rank: exact
    r2 = truncate(f, 2)
    s = torch.linalg.svdvals(delta["m"])
    err = torch.linalg.norm(delta["m"] - 0.5 * r2[B] @ r2[A])
    assert float(err) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-9)  # Eckart-Young


def test_dead_components_restart_from_init():
    adapter = {A: torch.tensor([[1.0], [0.0]]), B: torch.tensor([[2.0, 0.0]])}
    init = {A: torch.tensor([[9.0], [7.0]]), B: torch.zeros(1, 2)}
    out = fill_dead_components(adapter, init)
    assert out[A].flatten().tolist() == [1.0, 7.0] and torch.equal(out[B], adapter[B])


def test_assign_ranks_by_resource():
    # speeds 5, 1, 3, 4, 2, 6 -> sorted order 1,2 | 3,4 | 5,6 -> ranks 2 | 4 | 8
    assert assign_ranks([5, 1, 3, 4, 2, 6], [8, 2, 4]) == [8, 2, 4, 4, 2, 8]


def test_a_rank_r_client_leaves_higher_components_zero(tiny):
    model = attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(r=8, dropout=0.0))
    data = build_federated_data(DataConfig(tasks=("reverse",), examples_per_task=12, num_clients=1, max_length=48),
                                tiny.tokenizer, seed=0).clients[0].train
    start = mask_rank(get_adapter_state(model), 2)
    upd = local_train(model, start, data, TrainConfig(local_steps=4, lr=1e-2, weight_decay=0.01), 0.0, 0,
                      int(tiny.tokenizer.pad_token_id), flop_model(model))
    for k, v in upd.state.items():
        rest = v[2:] if "lora_A" in k else v[:, 2:]
        assert torch.count_nonzero(rest) == 0, k
    assert any(not torch.equal(upd.state[k], start[k]) for k in start)  # the first 2 components learned


@pytest.mark.parametrize("strategy", ["hetlora", "flora", "flexlora"])
def test_hetero_rank_runs_and_bytes_follow_rank(repo, tmp_path, strategy):
    out = tmp_path / strategy
    proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "run", "configs/tiny_hetero_rank.yaml",
                           f"fl.strategy={strategy}", "--out", str(out)], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    by_client = {c["client"]: c["bytes_up"] for c in rows[1]["client_stats"]}
    assert len(set(by_client.values())) == 3  # ranks 2, 4, 8 send three different sizes
    if strategy == "flora":
        assert (out / "base_delta.safetensors").stat().st_size > 0


def test_flora_gives_the_shared_base_model_back_unchanged(repo, tmp_path, tiny):
    from edgelam.config_load import load_config
    from edgelam.lifecycle import run

    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    cfg = load_config(repo / "configs/tiny_hetero_rank.yaml", ["fl.strategy=flora", "fl.rounds=2"])
    summary = run(cfg, tmp_path / "run")
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    after = dict(tiny.model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_model_rank_must_match_largest(repo, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "run", "configs/tiny_hetero_rank.yaml", "model.lora.r=4",
                           "--out", str(tmp_path / "x")], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2 and "model.lora.r (4) must equal the largest of fl.rank.ranks" in proc.stderr
