"""Clustered federated LoRA: the pure clustering functions by hand, and recovery of task families."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgelam.config import ClusterConfig, FLConfig, TrainConfig
from edgelam.fl.clustering import bipartition, cosine_matrix, kmeans, purity
from edgelam.fl.strategies.base import Population
from edgelam.fl.strategies.cfl import split_criterion
from edgelam.fl.strategies.rescluster import ResourceClusters
from edgelam.store import read_jsonl


def test_cosine_and_bipartition():
    v = [torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.9])]
    s = cosine_matrix(v)
    assert s[0, 0] == pytest.approx(1.0)
    assert s[0, 2] == pytest.approx(0.0)
    # cos([0.9, 0.1], [0.1, 0.9]) = 0.18 / 0.82 = 0.21951
    assert s[1, 3] == pytest.approx(0.18 / 0.82)
    a, b = bipartition(s)
    assert sorted([sorted(a), sorted(b)]) == [[0, 1], [2, 3]]


def test_split_criterion_by_hand():
    # opposite updates: mean 0 (< eps1), max norm 5 (> eps2): split
    d = [torch.tensor([3.0, 4.0]), torch.tensor([-3.0, -4.0])]
    split, mean_norm, max_norm = split_criterion(d, [1, 1], eps1=0.4, eps2=1.6)
    assert split and mean_norm == pytest.approx(0.0) and max_norm == pytest.approx(5.0)
    # agreeing updates: mean norm 5 is not < eps1: no split
    assert not split_criterion([d[0], d[0]], [1, 1], 0.4, 1.6)[0]
    # weights 3:1 -> mean = (3*[3,4] - [3,4]) / 4 = [1.5, 2]: norm 2.5
    assert split_criterion(d, [3, 1], 0.4, 1.6)[1] == pytest.approx(2.5)


def test_kmeans_and_purity():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    labels = kmeans(x, 2, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert purity(labels, ["a", "a", "b", "b"]) == 1.0
    assert purity([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.5
    # {0: [a, a, b]}, {1: [b]}: (2 + 1) / 4
    assert purity([0, 0, 0, 1], ["a", "a", "b", "b"]) == 0.75


def test_resource_clusters_group_devices_by_speed():
    fast, slow = [4e10, 4.2e10, 3.9e10], [4e9, 4.1e9, 3.8e9]
    pop = Population(6, fast + slow, [8.0] * 6, [10.0, 11.0, 10.5, 100.0, 98.0, 104.0])
    strat = ResourceClusters.from_config(FLConfig(strategy="rescluster", cluster=ClusterConfig(num_clusters=2)), TrainConfig())
    state = strat.init_state({"w": torch.zeros(1)}, pop)
    assert purity(strat.assignment(state, 6), ["fast"] * 3 + ["slow"] * 3) == 1.0
    assert set(strat.adapters(state)) == {"c0", "c1"}


@pytest.mark.parametrize("strategy", ["ifca", "cfl"])
def test_clustering_recovers_the_task_families(repo, tmp_path, strategy):
    """Two clients per task family (arithmetic vs reverse): the clusters must be the families."""
    out = tmp_path / strategy
    proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "run", "configs/tiny_clustered.yaml",
                           f"fl.strategy={strategy}", "--out", str(out)], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    final = rows[-1]["assignment"]
    assert purity(final, ["arithmetic", "arithmetic", "reverse", "reverse"]) == 1.0
    assert len(set(final)) == 2
    # each task is evaluated on its own cluster's adapter, and one adapter per cluster is saved
    tasks = rows[-1]["eval_tasks"]
    assert tasks["arithmetic"]["adapter"] == final[0] and tasks["reverse"]["adapter"] == final[2]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(set(final))
    assert {c["adapter"] for c in rows[-1]["client_stats"]} == set(final)
    if strategy == "cfl":  # the split criterion's norms are logged; ||mean update|| <= max ||update||
        diag = rows[1]["diagnostics"]
        assert 0 < diag["c0.mean_norm"] <= diag["c0.max_norm"]


def test_resource_clusters_run_on_the_tiny_config(repo, tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "run", "configs/tiny_clustered.yaml", "fl.strategy=rescluster",
                           "net.device_cpu_hz=[0.2e9,2.0e9]", "--out", str(out)], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(set(rows[-1]["assignment"])) == 2 and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[0]["assignment"] == rows[-1]["assignment"]  # fixed from the start: resources do not change
