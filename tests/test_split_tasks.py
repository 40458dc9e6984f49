"""Split learning of the tasks with their own input module and head (channel and beam prediction):
the CSI / feature encoder and the head on the device, the decoder's blocks cut with the edge server.
The cut model's loss and gradients equal the unsplit predictor's, and a split run trains, is
counted on the wire and saves an adapter that serves (the same format as a federated run's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import data_dir

from edgelam.config import ConfigError, LoraConfig
from edgelam.config_load import load_config
from edgelam.models.split import build_parts_split
from edgelam.split.step import evaluate, leaves, plan, step
from edgelam.tasks.beam import BeamPrediction
from edgelam.tasks.channel import ChannelPrediction

needs_deepmimo = pytest.mark.skipif(not (data_dir() / "deepmimo_new_york" / "params.mat").is_file(),
                                    reason="DeepMIMO new_york (deepmimo_new_york/) not found; set EDGELAM_DATA")
LORA = LoraConfig(4, 8, 0.0, ("q_proj", "v_proj"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELAM_CACHE", str(tmp_path / "cache"))


def _perturb(sm) -> None:
    """Non-zero LoRA B and head (they start at zero), so every trainable tensor gets a gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sm.peft.named_parameters():
            if p.requires_grad and ("lora_B" in n or "csi_head" in n):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _channel_task():
    task = ChannelPrediction(past=6, future=2, features_in=8, features_out=8)
    gen = torch.Generator().manual_seed(1)
    batch = {"past": torch.randn(3, 6, 8, generator=gen), "future": torch.randn(3, 2, 8, generator=gen)}
    return task, batch, "past"


def _beam_task():
    task = BeamPrediction(n_beams=8, features="position", features_in=3, n_tx=8, track_length=4)
    gen = torch.Generator().manual_seed(1)
    batch = {"features": torch.rand(3, 3, generator=gen), "label": torch.tensor([0, 5, 7]), "gains": torch.rand(3, 8, generator=gen)}
    return task, batch, "inputs"


@pytest.mark.parametrize("make", [_channel_task, _beam_task], ids=["channel", "beam"])
@pytest.mark.parametrize("cut", [(1, 2), (0, 1), (2, 2)])
def test_split_task_gradients_equal_unsplit(make, cut) -> None:
    task, batch, arg = make()
    base, tok = task.load("tiny", "float32", 0)
    sm = build_parts_split(task, base, tok, LORA, cut, seed=3)
    _perturb(sm)
    dev_state, srv_state = sm.initial_state()
    assert any("embed" in k for k in dev_state) and not any("embed" in k or "head" in k for k in srv_state)
    device = {s: leaves(dev_state, s) for s in ("front", "back")}
    server = leaves(srv_state, "middle")
    res = step(sm, device, server, batch, "float32", "float32", task)
    want = plan(sm, batch, "float32", "float32")
    assert want.total("up") == sum(v for k, v in res.bytes.items() if k.endswith("_up"))
    assert want.total("down") == sum(v for k, v in res.bytes.items() if k.endswith("_down"))
    if cut[0] < cut[1]:
        b, t = 3, task.size(None)
        assert res.bytes["act_up"] == res.bytes["feat_down"] == b * t * 64 * 4 and res.bytes["mask_up"] == 0
        assert res.bytes["grad_down"] == b * t * 64 * 4  # the device trains the input module: gradients come back
    # the reference: the unsplit predictor (what a federated client trains) on the same batch
    sm.peft.zero_grad()
    loss = task.loss(sm.peft, batch)
    loss.backward()
    ref = float(loss.detach())
    assert res.loss == pytest.approx(ref, rel=1e-6)
    worst, count = 0.0, 0
    for seg, got in (("front", device["front"]), ("back", device["back"]), ("middle", server)):
        for name, p in sm.trainable(seg).items():
            g = got[name].grad
            assert g is not None, f"{seg}.{name} got no gradient"
            worst = max(worst, float((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)))
            count += 1
    assert count >= 6 and worst < 1e-5
    assert evaluate(sm, dev_state, srv_state, [batch], task)["loss"] == pytest.approx(ref, rel=1e-6)


def test_split_channel_run_trains_counts_and_serves(tmp_path: Path, repo: Path) -> None:
    from edgelam.channels.data import build_channel_data
    from edgelam.lifecycle import run
    from edgelam.tasks.serving import load_served

    cfg = load_config(repo / "configs/tiny_channel.yaml", ["fl.strategy=sfl_v1", "split.cut=[1,2]", "fl.rounds=3",
                                                           "split.schedule.policy=all"])
    out = tmp_path / "run"
    summary = run(cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_nmse_db"] < rows[0]["eval_nmse_db"] - 1.0
    assert summary["final_eval_nmse_db"] == rows[-1]["eval_nmse_db"]
    kinds = rows[-1]["bytes_by_kind"]
    assert kinds["act_up"] == kinds["feat_down"] == kinds["grad_up"] == kinds["grad_down"] > 0
    assert kinds["mask_up"] == 0
    # the adapter is the channel task's own format: served through the task, it reproduces the final eval
    served = load_served(None, {"split": str(out / "adapter")})
    assert served.card["task"] == "channel_prediction" and served.card["model"] == "tiny"
    data, _ = build_channel_data(cfg.channels, cfg.data, cfg.seed)
    held = [s for xs in data.global_eval.values() for s in xs]
    with torch.no_grad():
        b = served.task.collate(held)
        sums = served.task.head_sums(served.task.output(served.model, b), b)
    assert served.task.metrics(sums)["nmse_db"] == pytest.approx(rows[-1]["eval_nmse_db"], abs=1e-3)


@needs_deepmimo
def test_split_beam_run_learns(tmp_path: Path, repo: Path) -> None:
    from edgelam.lifecycle import run

    before = torch.get_num_threads()
    try:
        cfg = load_config(repo / "configs/tiny_beam.yaml", ["fl.strategy=sfl_v2", "split.cut=[1,2]", "fl.rounds=2",
                                                            "split.schedule.policy=all"])
        run(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_top1"] > rows[0]["eval_top1"]


def test_token_embedding_lora_is_refused_for_a_task_with_its_own_input_module(repo: Path) -> None:
    with pytest.raises(ConfigError, match="split.embedding_lora"):
        load_config(repo / "configs/tiny_channel.yaml", ["fl.strategy=sfl_v2", "split.embedding_lora=true"])
