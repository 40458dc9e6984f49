"""Channels as data: the CDL generator, NMSE, the non-LLM predictors on hand-worked channels, and
the channel-prediction task trained federatedly on the tiny backbone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgelam.channels.csi import Environment, add_noise, coherence_time_s, generate
from edgelam.channels.predictors import (
    GRUPredictor,
    TransformerPredictor,
    ar_predict,
    fit,
    mrt_spectral_efficiency,
    nmse_db,
    repeat_last,
)
from edgelam.config_load import load_config
from edgelam.tasks.channel import complex_to_real, nmse_per_sample

ENV = Environment(profile="C", subcarriers=8, bs_rows=1, bs_cols=1, slots=20)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELAM_CACHE", str(tmp_path / "cache"))


def test_generator_is_reproducible_cached_and_unit_power(tmp_path) -> None:
    a = generate(ENV, 16, seed=3, stream=1, cache=False)
    b = generate(ENV, 16, seed=3, stream=1)  # generated again, then written to the cache
    assert a.h.shape == (16 * 2, 20, 16) and a.h.dtype == np.complex64
    assert np.array_equal(a.h, b.h) and np.array_equal(a.speed_kmh, b.speed_kmh)
    assert not np.array_equal(a.h, generate(ENV, 16, seed=3, stream=2, cache=False).h)
    assert float(np.mean(np.abs(a.h) ** 2)) == pytest.approx(1.0, rel=1e-4)  # unit average power per element
    assert np.all((a.speed_kmh >= 10) & (a.speed_kmh <= 100))
    files = list((tmp_path / "cache" / "channels").glob("CDL-C-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"damaged")  # a damaged cache file is regenerated, not an error
    assert np.array_equal(generate(ENV, 16, seed=3, stream=1).h, a.h)


def test_faster_users_decorrelate_sooner() -> None:
    def corr(speed: float) -> float:
        env = Environment(profile="A", subcarriers=4, bs_rows=1, bs_cols=1, slots=20, speed_kmh=(speed, speed))
        h = generate(env, 32, seed=0, cache=False).h
        return float(np.abs(np.mean(np.sum(h[:, 0] * np.conj(h[:, 10]), axis=-1))))
    assert corr(3.0) > corr(120.0)


def test_nmse_and_noise_on_hand_worked_values() -> None:
    target = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    assert nmse_per_sample(target, target).tolist() == [0.0, 0.0]
    assert nmse_per_sample(torch.zeros_like(target), target).tolist() == [1.0, 1.0]
    assert nmse_per_sample(0.5 * target, target).tolist() == [0.25, 0.25]
    assert nmse_db(0.5 * target, target) == pytest.approx(10 * math.log10(0.25))
    h = np.ones((4000, 4, 8), dtype=np.complex64)
    noisy = add_noise(h, np.full(4000, 10.0), np.random.default_rng(0))
    assert float(np.mean(np.abs(noisy - h) ** 2)) == pytest.approx(0.1, rel=0.02)  # SNR 10 dB


def test_mrt_spectral_efficiency_on_hand_worked_values() -> None:
    # one user, 2 BS antennas, h = [1, j] (each link a (1 slot, re | im) sample); SNR 0 dB (rho = 1)
    h = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mrt_spectral_efficiency(h, h, 2, 0.0) == pytest.approx(math.log2(3))  # perfect CSI: log2(1 + ||h||^2)
    assert mrt_spectral_efficiency(2.5 * h, h, 2, 0.0) == pytest.approx(math.log2(3))  # MRT ignores the scale
    only_first = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])  # w = [1, 0]: |h^H w|^2 = 1
    assert mrt_spectral_efficiency(only_first, h, 2, 0.0) == pytest.approx(1.0)
    orthogonal = torch.tensor([[[1.0, 0.0]], [[0.0, -1.0]]])  # w = [1, -j] / sqrt 2: no gain at all
    assert mrt_spectral_efficiency(orthogonal, h, 2, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert mrt_spectral_efficiency(h, h, 2, 10.0) == pytest.approx(math.log2(21))
    with pytest.raises(ValueError, match="multiple of 4 antennas"):
        mrt_spectral_efficiency(h, h, 4, 0.0)


def test_coherence_time_is_0423_c_over_v_fc() -> None:
    assert coherence_time_s(30.0, 2.4) == pytest.approx(0.423 * 299_792_458 / (30 / 3.6 * 2.4e9))
    assert coherence_time_s(30.0, 2.4) == pytest.approx(6.34e-3, rel=1e-3)
    assert coherence_time_s(0.0, 2.4) == math.inf


def test_ar_predicts_a_sum_of_doppler_tones_exactly() -> None:
    # two paths with Doppler phases per slot: exactly an AR(2) process on every subcarrier
    t = torch.arange(20, dtype=torch.float64)
    gains = torch.randn(3, 2, 6, dtype=torch.complex128)  # (samples, paths, subcarriers)
    doppler = torch.tensor([0.3, -0.7], dtype=torch.float64)
    h = (gains[:, :, None, :] * torch.exp(1j * doppler[None, :, None, None] * t[None, None, :, None])).sum(1)
    past, future = complex_to_real(h[:, :16]), complex_to_real(h[:, 16:])
    assert nmse_db(ar_predict(past, 4, order=2), future) < -80
    static = complex_to_real(h[:, :1].expand(-1, 20, -1))
    assert nmse_db(repeat_last(static[:, :16], 4), static[:, 16:]) < -100


def test_trained_baselines_learn_the_channel() -> None:
    env = Environment(profile="A", subcarriers=8, bs_rows=1, bs_cols=1, slots=20, speed_kmh=(30.0, 60.0))
    h = torch.from_numpy(generate(env, 128, seed=0, cache=False).h)[:, :, :8]
    past, future = complex_to_real(h[:, :16]), complex_to_real(h[:, 16:])
    for model in (GRUPredictor(16, 16, 4, hidden=32), TransformerPredictor(16, 16, 16, 4, d_model=32)):
        torch.manual_seed(0)
        losses = fit(model, past[:192], future[:192], epochs=15, batch_size=32, lr=3e-3)
        assert losses[-1] < losses[0]
        with torch.no_grad():
            assert nmse_db(model(past[192:]), future[192:]) < 0  # better than predicting zero


def test_tiny_channel_config_and_task(repo) -> None:
    cfg = load_config(repo / "configs/tiny_channel.yaml")
    assert cfg.task == "channel_prediction" and cfg.data.source == "cdl"
    from edgelam.config import ConfigError

    with pytest.raises(ConfigError, match="channels.profiles"):
        load_config(repo / "configs/tiny_channel.yaml", ["channels.profiles=[Z]"])
    with pytest.raises(ConfigError, match="task does not fit data.source"):
        load_config(repo / "configs/tiny_channel.yaml", ["task=causal_lm"])
    with pytest.raises(ConfigError, match="beams.base_stations names a base station twice"):
        load_config(repo / "configs/tiny_beam.yaml", ["beams.base_stations=[1,1]"])


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    """The tiny config end to end (its channels cached in a temporary folder)."""
    from edgelam.lifecycle import run

    tmp = tmp_path_factory.mktemp("channel")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELAM_CACHE", str(tmp / "cache"))
        cfg = load_config("configs/tiny_channel.yaml")
        summary = run(cfg, tmp / "run")
        yield cfg, summary, tmp / "run"


def test_federated_channel_prediction_beats_repeat_last(channel_run) -> None:
    """The trained predictor beats 'no prediction' on held-out users, its input module, head and
    norms travel in the adapter, and the saved adapter serves."""
    from edgelam.channels.data import build_channel_data
    from edgelam.infer.modules import ModuleHost, ModuleSpec

    cfg, summary, out = channel_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    data, _ = build_channel_data(cfg.channels, cfg.data, cfg.seed)
    held = [s for xs in data.global_eval.values() for s in xs]
    past, future = torch.stack([s.past for s in held]), torch.stack([s.future for s in held])
    baseline = nmse_db(repeat_last(past, cfg.channels.future), future)
    assert rows[0]["eval_nmse_db"] == pytest.approx(baseline, abs=1e-3)  # untrained: exactly "no prediction"
    assert rows[-1]["eval_nmse_db"] < baseline - 1.0
    assert summary["final_eval_loss"] < rows[0]["eval_loss"]
    card = json.loads((out / "adapter" / "edgelam_task.json").read_text())
    assert card["task"] == "channel_prediction" and card["past"] == 16 and card["future"] == 4
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("csi_embed" in k for k in saved) and any("csi_head" in k for k in saved)
    assert any("input_layernorm" in k for k in saved)  # the backbone's norms are tuned, as LLM4CP does
    host = ModuleHost(None, ModuleSpec("full"), {"cp": str(out / "adapter")})
    answers = host.predict([s.past.tolist() for s in held[:4]], "cp")
    got = torch.tensor([a["future"] for a in answers])
    assert got.shape == future[:4].shape
    assert nmse_db(got, future[:4]) < nmse_db(repeat_last(past[:4], 4), future[:4])


def test_a_trained_predictor_is_timed_against_the_coherence_time(channel_run, tmp_path) -> None:
    from edgelam.infer.deadline import run_predict
    from edgelam.infer.topology import load_topology

    _, _, out = channel_run
    topo_file = tmp_path / "serving.yaml"
    topo_file.write_text(f"""
mode: predict
run: {out}
requests: 5
speed_kmh: [30, 300]
nodes: [{{name: edge, flops_per_s: 1.0e12}}]
links: [{{a: device, b: edge, rtt_ms: 20, rate_mbps: 100}}]
""")
    report = run_predict(load_topology(topo_file))
    assert report["coherence_ms"] == {30.0: pytest.approx(6.3406, abs=1e-3), 300.0: pytest.approx(0.63406, abs=1e-4)}
    device, edge = report["placements"]
    assert (device["placement"], edge["placement"]) == ("device", "edge")
    assert edge["p50_ms"] >= 20.0 and edge["bytes_up"] > 16 * 16 * 4  # one (1, 16, 16) float32 past, plus framing
    assert edge["modelled_ms"] == pytest.approx(20 + 8e3 * (edge["bytes_up"] + edge["bytes_down"]) / 100e6
                                                + 1e3 * report["flops"] / 1e12, rel=1e-6)
    for r in report["placements"]:
        assert r["meets"] == {v: r["p95_ms"] <= tc for v, tc in report["coherence_ms"].items()}
    assert edge["meets"] == {30.0: False, 300.0: False}  # a 20 ms round trip misses 6.3 ms
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"mode: predict\nrun: {tmp_path}\nnodes: [{{name: edge, flops_per_s: 1.0e12}}]\n")
    from edgelam.config import ConfigError

    with pytest.raises(ConfigError, match="run must name a channel- or beam-prediction run folder"):
        load_topology(bad)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "ifca", "cfl", "rescluster",
                                      "fedasync", "fedbuff", "hierfavg", "hetlora", "flora", "flexlora"])
def test_every_strategy_runs_on_tiny_channel(tmp_path, repo, strategy: str) -> None:
    from edgelam.lifecycle import run

    extra = {"hetlora": ["fl.rank.ranks=[2,4]"], "flexlora": ["fl.rank.ranks=[2,4]"], "flora": ["fl.rank.ranks=[2,4]"],
             "fedprox": ["train.prox_mu=0.01"]}.get(strategy, [])
    cfg = load_config(repo / "configs/tiny_channel.yaml", [f"fl.strategy={strategy}", "fl.rounds=1",
                                                           "channels.users_per_client=4", *extra])
    run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_nmse_db"] is not None and math.isfinite(rows[-1]["eval_nmse_db"])
    assert rows[-1]["bytes_up"] > 0
