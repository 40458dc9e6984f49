"""Several sensing tasks on one backbone (task multitask_sensing): the breathing generator, per-task
heads trained and sent by their own clients only and averaged over them, and a tiny federated run
that learns both tasks and serves both answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simpy
import torch

from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.fl.aggregate import coordinate_median, fill_unsent, weighted_average
from edgelam.sensing import synthetic
from edgelam.sensing.baselines import breathing_rate_fft
from edgelam.sensing.data import relative

SMALL = ["sensing.per_class=6", "sensing.eval_per_class=6", "train.local_steps=4"]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_breathing_rate_is_in_the_generated_csi() -> None:
    """The chest's motion at the drawn rate shows as the dominant frequency of the amplitudes."""
    cfg = synthetic.RoomConfig(frames=300, packet_rate_hz=10.0, snr_db=float("inf"), phase_noise=False)
    h, bpm = synthetic.generate_breathing_set(cfg, 6, np.random.default_rng(3), (8.0, 24.0))
    assert h.shape == (6, 300, 30, 2, 2) and h.dtype == np.complex64 and ((bpm >= 8) & (bpm <= 24)).all()
    est = breathing_rate_fft(relative(np.abs(h).reshape(6, 300, -1)), 10.0, (6.0, 30.0))
    np.testing.assert_allclose(est, bpm, atol=1.0)
    # the estimator by hand: a pure 0.25 Hz sway of one feature's amplitude is 15 bpm
    t = np.arange(200) / 10.0
    pure = np.stack([np.sin(2 * np.pi * 0.25 * t), np.zeros(200)], axis=1)[None]
    assert breathing_rate_fft(pure, 10.0)[0] == pytest.approx(15.0, abs=0.15)
    with pytest.raises(ValueError, match="breath_bpm is given exactly"):
        synthetic.generate_window(cfg, "walking", np.random.default_rng(0), breath_bpm=12.0)
    with pytest.raises(ValueError, match="Nyquist"):
        synthetic.generate_window(cfg, "breathing", np.random.default_rng(0), breath_bpm=400.0)


def test_fill_unsent_by_hand() -> None:
    states = [{"shared": torch.tensor([1.0]), "head": torch.tensor([10.0]), "none": torch.tensor([5.0])},
              {"shared": torch.tensor([3.0]), "head": torch.tensor([0.0]), "none": torch.tensor([5.0])},
              {"shared": torch.tensor([5.0]), "head": torch.tensor([20.0]), "none": torch.tensor([5.0])}]
    weights = [1.0, 2.0, 3.0]
    unsent = [frozenset({"none"}), frozenset({"head", "none"}), frozenset({"none"})]
    out = fill_unsent(states, weights, unsent)
    # client 1 did not send the head: every state holds the senders' mean (10 * 1 + 20 * 3) / 4 = 17.5
    assert [float(s["head"]) for s in out] == [17.5, 17.5, 17.5]
    avg = weighted_average(out, weights)
    assert float(avg["head"]) == pytest.approx(17.5)  # the senders' mean, not diluted by the silent client
    assert float(avg["shared"]) == pytest.approx((1 + 6 + 15) / 6)
    assert float(avg["none"]) == 5.0  # nobody sent it: unchanged
    assert float(states[1]["head"]) == 0.0  # the inputs are not modified
    # a robust reducer: the median over the senders (1, 1.1, 100), not pulled by copies of their mean
    many = [{"h": torch.tensor([v])} for v in (1.0, 1.1, 100.0, 0.0, 0.0, 0.0)]
    silent = [frozenset()] * 3 + [frozenset({"h"})] * 3
    got = coordinate_median(fill_unsent(many, [1.0] * 6, silent, coordinate_median), [1.0] * 6)
    assert float(got["h"]) == pytest.approx(1.1)
    # per-key weights (an edge server: the samples of its devices that sent the key)
    edges = [{"h": torch.tensor([2.0])}, {"h": torch.tensor([8.0])}, {"h": torch.tensor([0.0])}]
    got = fill_unsent(edges, [10.0, 10.0, 5.0], [frozenset(), frozenset(), frozenset({"h"})],
                      key_weights=[{"h": 1.0}, {"h": 3.0}, {}])
    assert float(got[2]["h"]) == pytest.approx((2 * 1 + 8 * 3) / 4)


def test_each_head_is_trained_sent_and_averaged_by_its_own_clients(repo: Path) -> None:
    from edgelam.fl.context import population, setup
    from edgelam.fl.rounds import filled, run_round
    from edgelam.fl.strategies.base import GLOBAL, get_prefixed
    from edgelam.fl.transforms import build_chain
    from edgelam.models.lora import get_adapter_state, serialize
    from edgelam.rundir import RunState

    cfg = load_config(repo / "configs/tiny_multitask_sensing.yaml", SMALL)
    ctx = setup(cfg)
    ctx.chain = build_chain(cfg.fl)
    start = get_adapter_state(ctx.model)
    st = RunState(0, 0.0, ctx.strategy.init_state(start, population(ctx)))
    res = run_round(simpy.Environment(), ctx, st, [0, 1, 2, 3], 1)
    jobs = {j.client: j for j in res.jobs}
    act = [k for k in start if ".head_activity." in k or ".embed_activity." in k]  # each task's head and encoder
    resp = [k for k in start if ".head_respiration." in k or ".embed_respiration." in k]
    shared = [k for k in start if "lora_A" in k]
    assert act and resp and shared
    assert any(".embed_respiration." in k for k in resp) and any(".head_respiration." in k for k in resp)
    for k in (0, 2):  # activity clients: the respiration head and encoder are neither trained nor sent
        assert jobs[k].update.unsent == frozenset(resp)
        assert all(torch.equal(jobs[k].update.state[key], start[key]) for key in resp)
        assert not all(torch.equal(jobs[k].update.state[key], start[key]) for key in act)
    full = len(serialize(start))
    assert all(j.cost.bytes_up < full for j in res.jobs)  # another task's head and encoder stay off the air
    new = get_prefixed(ctx.strategy.aggregate(st.state, filled([j.update for j in res.jobs], ctx.strategy.reduce), 1), GLOBAL)
    for keys, holders in ((act, (0, 2)), (resp, (1, 3)), (shared, (0, 1, 2, 3))):
        for key in keys:
            want = sum(jobs[k].update.state[key].double() for k in holders) / len(holders)  # equal sample counts
            torch.testing.assert_close(new[key].double(), want, rtol=1e-6, atol=1e-7)


def test_tiny_multitask_run_learns_both_tasks_and_serves_both(tmp_path: Path, repo: Path) -> None:
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.lifecycle import run
    from edgelam.sensing.data import build_multitask_data

    cfg = load_config(repo / "configs/tiny_multitask_sensing.yaml", ["fl.rounds=4", "eval.every=4"])
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["eval_tasks"], rows[-1]["eval_tasks"]
    assert set(last) == {"activity", "respiration"}
    assert last["activity"]["accuracy"] > 0.2 + 0.1  # 5 balanced activities: chance is 0.2
    assert last["respiration"]["rate_mae_bpm"] < first["respiration"]["rate_mae_bpm"] - 1.0
    assert "rate_mae_bpm" not in last["activity"] and "accuracy" not in last["respiration"]
    assert summary["final_eval_rate_mae_bpm"] == rows[-1]["eval_rate_mae_bpm"]
    card = json.loads((tmp_path / "run" / "adapter" / "edgelam_task.json").read_text())
    assert card["task"] == "multitask_sensing" and card["tasks"] == ["activity", "respiration"] and card["task_embeddings"]
    data, _ = build_multitask_data(cfg.sensing, cfg.data, cfg.seed)
    held = data.global_eval["respiration"][:8]
    host = ModuleHost(None, ModuleSpec("full"), {"s": str(tmp_path / "run" / "adapter")})
    answers = host.predict([((s.window + 1.0) * 2.0).tolist() for s in held], "s")
    assert all(a["label"] in cfg.sensing.classes and 0 < a["respiration_bpm"] < 60 for a in answers)
    task = host.task
    with torch.no_grad(), host.served.use("s"):
        m = task.metrics(task.eval_sums(host.served.model, task.collate(held)))  # with the windows' task ids
    got = np.mean([abs(a["respiration_bpm"] - s.value) for a, s in zip(answers, held)])
    assert got == pytest.approx(m["rate_mae_bpm"], abs=2e-3)  # served answers are what the run measures


def test_config_errors(repo: Path) -> None:
    path = repo / "configs/tiny_multitask_sensing.yaml"
    with pytest.raises(ConfigError, match="data.source"):
        load_config(path, ["data.source=wifi", "data.partition=by_task"])
    with pytest.raises(ConfigError, match="fl.strategy"):
        load_config(path, ["fl.strategy=sfl_v2"])
    with pytest.raises(ConfigError, match="sensing.tasks"):
        load_config(path, ["sensing.tasks=[activity,heartbeat]"])
    with pytest.raises(ConfigError, match="sensing.respiration_bpm"):
        load_config(path, ["sensing.respiration_bpm=[8,400]"])
    with pytest.raises(ConfigError, match="sensing.respiration_bpm"):
        load_config(path, ["sensing.respiration_bpm=[12,12]"])  # nothing to regress
    with pytest.raises(ConfigError, match="data.num_clients"):
        load_config(path, ["data.num_clients=1"])
    with pytest.raises(ConfigError, match="applies to task multitask_sensing only"):
        load_config(repo / "configs/tiny_sensing.yaml", ["sensing.tasks=[respiration]"])


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff", "hierfavg", "ifca"])
def test_multitask_runs_on_the_async_and_hierarchical_drivers(tmp_path: Path, repo: Path, strategy: str) -> None:
    """Partial updates pass the event clock (checkpointed in flight), the edge tier and clusters (filled per
    cluster); every head stays finite."""
    from edgelam.lifecycle import run

    extra = ["fl.hier.kappa1=2", "fl.hier.kappa2=1"] if strategy == "hierfavg" else ["train.local_steps=2"]
    cfg = load_config(repo / "configs/tiny_multitask_sensing.yaml", [f"fl.strategy={strategy}", "fl.rounds=2", *SMALL[:2],
                                                                      *extra])
    summary = run(cfg, tmp_path / "run")
    assert np.isfinite(summary["final_eval_rate_mae_bpm"]) and np.isfinite(summary["final_eval_accuracy"])


def test_shared_sensor_embedding_is_sent_by_everyone(repo: Path) -> None:
    """sensing.task_embeddings: false -- one encoder for all tasks: only the other head stays home."""
    from edgelam.sensing.data import build_multitask_data
    from edgelam.tasks.sensing_multi import MultiTaskSensing

    cfg = load_config(repo / "configs/tiny_multitask_sensing.yaml", [*SMALL, "sensing.task_embeddings=false"])
    data, shape = build_multitask_data(cfg.sensing, cfg.data, cfg.seed)
    shared = MultiTaskSensing(cfg.sensing.tasks, shape.classes, shape.window, shape.features, cfg.sensing.patch,
                              "patch", task_embeddings=False)
    own = MultiTaskSensing(cfg.sensing.tasks, shape.classes, shape.window, shape.features, cfg.sensing.patch, "patch")
    assert shared.untrained(data.clients[0].train) == (".head_respiration.",)
    assert set(own.untrained(data.clients[1].train)) == {".head_activity.", ".embed_activity."}
