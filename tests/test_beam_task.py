"""Beam prediction as a task: its sums by hand, its request checks, the DeepMIMO data split, and
the tiny config trained federatedly, saved and served (the real data: DeepMIMO New York)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_dir
from safetensors.torch import load_file

from edgelam.channels.beams import gain_loss_db
from edgelam.config import STRATEGY_DRIVERS, ConfigError
from edgelam.config_load import load_config
from edgelam.data.sources import DataError
from edgelam.tasks.beam import BeamPrediction

needs_deepmimo = pytest.mark.skipif(not (data_dir() / "deepmimo_new_york" / "params.mat").is_file(),
                                    reason="DeepMIMO new_york (deepmimo_new_york/) not found; set EDGELAM_DATA")
FEDERATED = [name for name, driver in STRATEGY_DRIVERS.items() if driver != "split"]


@pytest.fixture(autouse=True)
def _threads():
    """tiny_beam.yaml sets threads: 1 for its run; give the other tests their thread count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --- without the data ---


def test_sums_by_hand() -> None:
    task = BeamPrediction(n_beams=4, features="position", features_in=3, n_tx=4, track_length=4)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0],   # ranking 1, 2, 3, 0: label 1 is top-1
                           [5.0, 0.0, 1.0, 4.0]])  # ranking 0, 3, 2, 1: label 2 is 3rd, beam 0 picked
    gains = torch.tensor([[0.1, 1.0, 0.5, 0.2], [0.01, 0.2, 1.0, 0.3]])  # relative to the oracle beam
    batch = {"label": torch.tensor([1, 2]), "gains": gains}
    sums = task.head_sums(logits, batch)
    assert sums["count"] == 2 and sums["correct1"] == 1 and sums["correct3"] == 2
    assert sums["gain_loss_db_sum"] == pytest.approx(0.0 + 20.0)  # user 2 gets 0.01 of its best: 20 dB
    ce = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="sum")
    assert sums["loss_sum"] == pytest.approx(float(ce))
    m = task.metrics(sums)
    assert (m["top1"], m["top3"], m["gain_loss_db"]) == (0.5, 1.0, pytest.approx(10.0))
    assert m["gain_loss_db"] == pytest.approx(gain_loss_db(np.array([1, 0]), gains.numpy()))
    assert math.isnan(task.metrics({})["top1"])


def test_requests_are_checked() -> None:
    track = BeamPrediction(n_beams=8, features="track", features_in=3, n_tx=4, track_length=3)
    assert track.request(None, [[1, 2, 3], [0, 0, 7]], 0)["past_beams"].dtype == torch.int64
    for bad, what in (([[1, 2, 3.5]], "integers"), ([[1, 2]], "shape"), ([[1, 2, 8]], r"\[0, 8\)"), ([], "shape")):
        with pytest.raises(ValueError, match=what):
            track.request(None, bad, 0)
    pos = BeamPrediction(n_beams=8, features="position", features_in=3, n_tx=4, track_length=3)
    assert pos.request(None, [[0.1, -0.2, 0.0]], 0)["features"].shape == (1, 3)
    with pytest.raises(ValueError, match="NaN"):
        pos.wire_inputs({"features": torch.tensor([[0.0, float("nan"), 1.0]])})
    with pytest.raises(ValueError, match="'features' of shape"):
        pos.wire_inputs({"features": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="features must be one of"):
        BeamPrediction.from_card({"features": "pixels"}, None)


def test_config_and_missing_data_folder(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgelam.tasks import setup_task

    cfg = load_config(repo / "configs/tiny_beam.yaml")
    assert cfg.task == "beam_prediction" and cfg.data.source == "deepmimo"
    with pytest.raises(ConfigError, match="data.partition"):
        load_config(repo / "configs/tiny_beam.yaml", ["data.partition=dirichlet"])
    monkeypatch.setenv("EDGELAM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="params.mat.*EDGELAM_DATA.*deepmimo_new_york"):
        setup_task(cfg)


# --- DeepMIMO New York ---


@needs_deepmimo
@pytest.mark.parametrize("partition", ["by_task", "iid"])
def test_test_users_are_no_clients_and_cells_are_kept_apart(repo: Path, partition: str) -> None:
    from edgelam.channels.beam_data import build_beam_data

    cfg = load_config(repo / "configs/tiny_beam.yaml", [f"data.partition={partition}"])
    data, shape = build_beam_data(cfg.beams, cfg.data, cfg.seed)
    assert shape.features_in == 3 and sorted(data.global_eval) == ["BS1", "BS2", "BS3"]
    test = {tuple(s.inputs.tolist()) for xs in data.global_eval.values() for s in xs}
    train = [tuple(s.inputs.tolist()) for c in data.clients for s in c.train]
    assert len(set(train)) == len(train) and not test & set(train)  # each user once, never both
    by_client = [c.tasks for c in data.clients]
    assert by_client == ([["BS1"], ["BS2"], ["BS3"]] if partition == "by_task" else [["BS1", "BS2", "BS3"]] * 3)
    again, _ = build_beam_data(cfg.beams, cfg.data, cfg.seed)
    assert [len(c.train) for c in again.clients] == [len(c.train) for c in data.clients]
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(again.clients[0].train, data.clients[0].train))


@needs_deepmimo
def test_federated_beam_prediction_learns_and_serves(tmp_path: Path, repo: Path) -> None:
    """The tiny config end to end: top-1 well above chance and round 0, a smaller gain loss, the
    input module and head in the saved adapter, and the served adapter answers as the run measured."""
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.lifecycle import run

    cfg = load_config(repo / "configs/tiny_beam.yaml")
    run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert last["eval_top1"] > max(3 / cfg.beams.n_beams, first["eval_top1"])
    assert last["eval_top3"] > first["eval_top3"] and last["eval_gain_loss_db"] < first["eval_gain_loss_db"]
    adapter = tmp_path / "run" / "adapter"
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    for part in ("beam_embed.", "beam_head.", "backbone.norm.", "lora_A"):
        assert any(part in k for k in keys), part
    card = json.loads((adapter / "edgelam_task.json").read_text())
    assert card["task"] == "beam_prediction" and card["n_beams"] == 64 and card["features"] == "position"

    from edgelam.channels.beam_data import build_beam_data

    data, _ = build_beam_data(cfg.beams, cfg.data, cfg.seed)
    test = [s for xs in data.global_eval.values() for s in xs]
    host = ModuleHost(None, ModuleSpec("full"), {"b": str(adapter)})
    answers = host.predict([s.inputs.tolist() for s in test], "b")
    beams = np.array([a["beam"] for a in answers])
    assert all(a["top3"][0] == a["beam"] and len(a["top3"]) == 3 for a in answers)
    # the run's last evaluation, recomputed from the served answers (within one user of rounding)
    top1 = float(np.mean(beams == np.array([s.label for s in test])))
    assert top1 == pytest.approx(last["eval_top1"], abs=1.01 / len(test))
    loss_db = gain_loss_db(beams, torch.stack([s.gains for s in test]).double().numpy())
    assert loss_db == pytest.approx(last["eval_gain_loss_db"], abs=0.1)

    # timed against the coherence time at the scenario's own carrier (DeepMIMO New York: 3.5 GHz)
    from edgelam.channels.csi import coherence_time_s
    from edgelam.infer.deadline import run_predict
    from edgelam.infer.topology import load_topology

    topo = tmp_path / "serving.yaml"
    topo.write_text(f"mode: predict\nrun: {tmp_path / 'run'}\nrequests: 3\n"
                    "nodes: [{name: edge, flops_per_s: 1.0e12}]\nlinks: [{a: device, b: edge, rtt_ms: 2, rate_mbps: 100}]\n")
    report = run_predict(load_topology(topo))
    assert report["task"] == "beam_prediction" and report["carrier_ghz"] == pytest.approx(3.5)
    assert report["coherence_ms"] == {30.0: pytest.approx(1e3 * coherence_time_s(30.0, 3.5))}
    edge = report["placements"][1]
    assert edge["placement"] == "edge" and edge["p50_ms"] >= 2.0 and edge["bytes_up"] > 4 * test[0].inputs.numel()


@needs_deepmimo
def test_track_features_learn_the_next_beam(tmp_path: Path, repo: Path) -> None:
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.lifecycle import run

    cfg = load_config(repo / "configs/tiny_beam.yaml", ["beams.features=track", "fl.rounds=2", "train.local_steps=25"])
    run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    assert rows[-1]["eval_top1"] > max(3 / 64, rows[0]["eval_top1"])
    host = ModuleHost(None, ModuleSpec("full"), {"t": str(tmp_path / "run" / "adapter")})
    answers = host.predict([[10, 11, 12, 13], [40, 40, 41, 41]], "t")
    assert [0 <= a["beam"] < 64 for a in answers] == [True, True]


@needs_deepmimo
@pytest.mark.parametrize("strategy", FEDERATED)
def test_every_strategy_runs_on_tiny_beam(tmp_path: Path, repo: Path, strategy: str) -> None:
    from edgelam.lifecycle import run

    extra = {"hetlora": ["fl.rank.ranks=[2,4]"], "flexlora": ["fl.rank.ranks=[2,4]"], "flora": ["fl.rank.ranks=[2,4]"],
             "fedprox": ["train.prox_mu=0.01"]}.get(strategy, [])
    cfg = load_config(repo / "configs/tiny_beam.yaml", [f"fl.strategy={strategy}", "fl.rounds=1", "train.local_steps=2",
                                                        "beams.users_per_client=16", "eval.max_per_task=32", *extra])
    run(cfg, tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    assert math.isfinite(rows[-1]["eval_top1"]) and math.isfinite(rows[-1]["eval_gain_loss_db"])
    assert rows[-1]["bytes_up"] > 0
