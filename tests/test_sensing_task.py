"""Activity recognition from Wi-Fi CSI as a task: tokens (codes round-trip, the federated codebook,
uplink bytes, lossy tokens), its metrics by hand, and the tiny config trained federatedly (both
tokenizers), split, saved and served; the real recordings' folds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_dir

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.sensing.tokens import corrupt, encode, federated_codebook, uplink_bytes, weighted_kmeans
from edgelam.tasks.sensing import ActivityRecognition, codebook_from_card, codebook_to_card

needs_wifi = pytest.mark.skipif(not (data_dir() / "wifi_csi" / "labelled_2020" / "intel" / "activity").is_dir(),
                                reason="Wi-Fi CSI recordings (wifi_csi/labelled_2020) not found; set EDGELAM_DATA")


@pytest.fixture(autouse=True)
def _threads():
    """tiny_sensing.yaml sets threads: 1 for its run; give the other tests their thread count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --- tokens ---


def test_codes_round_trip_through_the_codebook_and_the_card() -> None:
    book = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    assert encode(book, book).tolist() == list(range(16))  # each codebook vector is its own code
    near = book[[3, 3, 9, 0]] + 1e-3
    assert encode(near, book).tolist() == [3, 3, 9, 0]
    back = codebook_from_card(json.loads(json.dumps(codebook_to_card(book))))
    assert torch.equal(back, book)  # exact, through JSON
    task = ActivityRecognition(["a", "b"], window=20, features=3, patch=5, tokenizer="vq", codebook=book)
    again = ActivityRecognition.from_card(task.card(), None)
    windows = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(task.tokenize(windows), again.tokenize(windows))
    with pytest.raises(ValueError, match="codebook holds"):
        codebook_from_card(codebook_to_card(book) | {"codebook_shape": [16, 7]})


def test_federated_codebook_finds_the_clusters_no_client_shares() -> None:
    """Four well-separated clusters, each client holding two of them: the merged codebook has a
    code at each cluster's centre, though no client saw all four."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])

    def blob(c: int, n: int) -> np.ndarray:
        return centres[c] + 0.1 * rng.standard_normal((n, 2))

    clients = [np.concatenate([blob(0, 50), blob(1, 50)]), np.concatenate([blob(2, 50), blob(3, 50)])]
    book = federated_codebook(clients, 4, seed=3).numpy()
    dist = np.linalg.norm(book[:, None, :] - centres[None], axis=-1)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3] and dist.min(1).max() < 0.1
    # the server's weighted k-means weighs each centroid by its count
    pts, w = np.array([[0.0], [1.0]]), np.array([3.0, 1.0])
    assert weighted_kmeans(pts, w, 1, np.random.default_rng(0))[0, 0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="fewer than the codebook"):
        federated_codebook([np.zeros((3, 2))], 4, seed=0)


def test_uplink_bytes_by_hand() -> None:
    # Intel 5300, 2x2: a payload of ceil(30 x (16 x 4 + 3) / 8) = 252 bytes a frame
    assert uplink_bytes("raw", 100, 2, 2, 10, 64, 64) == 100 * 252
    assert uplink_bytes("embedding", 100, 2, 2, 10, 64, 64) == 10 * 64 * 4
    assert uplink_bytes("tokens", 100, 2, 2, 10, 64, 64) == 8  # 10 codes x 6 bits = 60 bits
    assert uplink_bytes("tokens", 100, 2, 2, 10, 64, 65) == 9  # 65 codes need 7 bits: 70 bits
    with pytest.raises(ValueError, match="representation"):
        uplink_bytes("bits", 100, 2, 2, 10, 64, 64)


def test_lossy_tokens() -> None:
    codes = torch.arange(40).reshape(4, 10) % 8
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(corrupt(codes, 0.0, gen, 8), codes)
    hit = corrupt(codes, 0.5, torch.Generator().manual_seed(0), 8)
    assert torch.equal(hit, corrupt(codes, 0.5, torch.Generator().manual_seed(0), 8))  # the same draws
    assert 0 < int((hit != codes).sum()) < 40 and int(hit.max()) < 8
    patches = torch.ones(4, 10, 6)
    lost = corrupt(patches, 1.0, gen, None)
    assert float(lost.abs().sum()) == 0.0  # every patch zeroed


def test_metrics_by_hand() -> None:
    task = ActivityRecognition(["a", "b", "c"], window=10, features=2, patch=5, tokenizer="patch")
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0]])  # predicts a, a, b, b
    batch = {"labels": torch.tensor([0, 1, 1, 1])}  # truth a, b, b, b; c absent
    m = task.metrics(task.head_sums(logits, batch))
    assert m["accuracy"] == pytest.approx(0.75)
    # F1(a) = 2*1 / (2 + 1 + 0) = 2/3; F1(b) = 2*2 / (4 + 0 + 1) = 4/5; c is absent and not counted
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert math.isnan(task.metrics({})["accuracy"])


# --- the tiny config (generated windows) ---


@pytest.mark.parametrize("tokenizer", ["patch", "vq"])
def test_tiny_sensing_beats_the_majority_class_and_serves(tmp_path: Path, repo: Path, tokenizer: str) -> None:
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.lifecycle import run
    from edgelam.sensing.data import build_sensing_data

    cfg = load_config(repo / "configs/tiny_sensing.yaml", [f"sensing.tokenizer={tokenizer}"])
    summary = run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    data, _ = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    held = [s for xs in data.global_eval.values() for s in xs]
    majority = max(np.bincount([s.label for s in held])) / len(held)
    assert rows[-1]["eval_accuracy"] > majority + 0.2 and rows[-1]["eval_macro_f1"] > 0.4
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"]
    card = json.loads((tmp_path / "run" / "adapter" / "edgelam_task.json").read_text())
    assert card["task"] == "activity_recognition" and card["tokenizer"] == tokenizer
    assert ("codebook_f32" in card) == (tokenizer == "vq")
    # served from raw amplitude windows (any gain: the service takes them relative to their mean),
    # it answers as the run measured
    host = ModuleHost(None, ModuleSpec("full"), {"s": str(tmp_path / "run" / "adapter")})
    raw = [((s.window + 1.0) * 3.7).tolist() for s in held]
    answers = host.predict(raw, "s")
    got = np.mean([cfg.sensing.classes.index(a["label"]) == s.label for a, s in zip(answers, held)])
    assert got == pytest.approx(rows[-1]["eval_accuracy"], abs=1.01 / len(held))
    # over an uplink that loses most tokens, the same model does measurably worse
    lossy = ActivityRecognition.from_card(card, None)
    lossy.token_error_rate = 0.8
    with torch.no_grad(), host.served.use("s"):
        b = lossy.collate(held)
        m = lossy.metrics(lossy.eval_sums(host.served.model, b))
    assert m["accuracy"] < rows[-1]["eval_accuracy"] - 0.15


def test_split_sensing_learns(tmp_path: Path, repo: Path) -> None:
    """The sensor tokenizer and embedding on the device, the blocks cut with the edge server."""
    from edgelam.lifecycle import run

    cfg = load_config(repo / "configs/tiny_sensing.yaml", ["fl.strategy=sfl_v2", "split.cut=[1,2]",
                                                           "split.schedule.policy=all", "fl.rounds=3"])
    run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.15
    kinds = rows[-1]["bytes_by_kind"]
    assert kinds["act_up"] == kinds["grad_down"] > 0 and kinds["mask_up"] == 0


def test_config_errors(repo: Path) -> None:
    with pytest.raises(ConfigError, match="sensing.patch"):
        load_config(repo / "configs/tiny_sensing.yaml", ["sensing.patch=7"])
    with pytest.raises(ConfigError, match="data.partition"):
        load_config(repo / "configs/tiny_sensing.yaml", ["data.partition=by_task"])
    with pytest.raises(ConfigError, match="sensing.classes"):
        load_config(repo / "configs/tiny_sensing.yaml", ["sensing.classes=[empty,dancing]"])


# --- the real recordings ---


@needs_wifi
def test_real_recordings_fold_by_recording(repo: Path) -> None:
    from edgelam.data.sources import DataError
    from edgelam.sensing.data import build_sensing_data

    cfg = load_config(repo / "configs/tiny_sensing.yaml", ["data.source=wifi", "data.partition=by_task",
                                                           "sensing.folds=4", "sensing.fold=1"])
    data, shape = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    assert shape.classes == ("brushteeth", "cook", "getintobed", "sleeping", "walk", "washingdishes")
    assert shape.features == 120 and (shape.n_rx, shape.n_tx) == (2, 2)
    test_recs = {s.task for s in data.global_eval["held-out"]}
    train_recs = [{s.task for s in c.train} for c in data.clients]
    assert test_recs and all(not (r & test_recs) for r in train_recs)  # no recording on both sides
    assert all(a.isdisjoint(b) for i, a in enumerate(train_recs) for b in train_recs[i + 1:])  # by recording
    again, _ = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    assert {s.task for s in again.global_eval["held-out"]} == test_recs  # the folds are seeded
    loro = load_config(repo / "configs/tiny_sensing.yaml", ["data.source=wifi", "sensing.folds=25"])
    with pytest.raises(DataError, match="exceeds the 24 recordings"):
        build_sensing_data(loro.sensing, loro.data, loro.seed)


@pytest.mark.parametrize("strategy", ["fedprox", "ifca", "fedbuff", "hierfavg", "flexlora"])
def test_other_strategies_run_on_tiny_sensing(tmp_path: Path, repo: Path, strategy: str) -> None:
    """One scheme of each driver (and a heterogeneous-rank one) runs the task unchanged."""
    from edgelam.lifecycle import run

    extra = {"flexlora": ["fl.rank.ranks=[2,4]"], "fedprox": ["train.prox_mu=0.01"]}.get(strategy, [])
    cfg = load_config(repo / "configs/tiny_sensing.yaml", [f"fl.strategy={strategy}", "fl.rounds=1", "train.local_steps=3",
                                                           "sensing.per_class=4", "sensing.tokenizer=vq",
                                                           "sensing.codebook=8", *extra])
    run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    assert math.isfinite(rows[-1]["eval_accuracy"]) and rows[-1]["bytes_up"] > 0
