"""Asynchronous federated LoRA: staleness functions by hand, FedAsync/FedBuff on the event clock,
exact resume with updates in flight, and the synchronous deadline baseline."""

import pytest
import torch

from edgelam.config import AsyncConfig, FLConfig, TrainConfig
from edgelam.config_load import load_config
from edgelam.fl.aggregate import buffered_step, mix, staleness_weight
from edgelam.lifecycle import run
from edgelam.fl.strategies.base import Population
from edgelam.fl.strategies.fedbuff import FedBuff
from edgelam.store import read_jsonl


@pytest.mark.parametrize("kind, tau, expected", [
    ("constant", 7, 1.0),
    ("polynomial", 0, 1.0),
    ("polynomial", 3, 0.5),  # (3 + 1)^-0.5
    ("hinge", 4, 1.0),  # tau <= b
    ("hinge", 6, 1 / 21),  # 1 / (10 * (6 - 4) + 1)
])
def test_staleness_functions(kind, tau, expected):
    assert staleness_weight(kind, tau, a=0.5 if kind == "polynomial" else 10.0, b=4.0) == pytest.approx(expected)


def test_fedasync_mix_and_fedbuff_step_by_hand():
    g, x = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    assert float(mix(g, x, 0.25)["w"]) == pytest.approx(1.5)  # 0.75 * 1 + 0.25 * 3
    assert float(buffered_step(g, {"w": torch.tensor([0.6])}, 3, lr=1.0)["w"]) == pytest.approx(0.8)


class _U:
    def __init__(self, w: float, client: int = 0):
        self.state, self.num_samples, self.client, self.adapter = {"w": torch.tensor([w])}, 1, client, "global"


def test_fedbuff_buffers_k_weighted_deltas():
    strat = FedBuff.from_config(FLConfig(strategy="fedbuff", asynchronous=AsyncConfig(buffer_size=2, staleness="polynomial", a=0.5)),
                                TrainConfig())
    state = strat.init_state({"w": torch.tensor([1.0])}, Population(2, [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]))
    start = {"w": torch.tensor([1.0])}
    state, changed = strat.on_arrival(state, _U(0.0), start, staleness=0)  # delta 1, weight 1
    assert not changed and float(state["global.w"]) == 1.0
    state, changed = strat.on_arrival(state, _U(0.5, 1), start, staleness=3)  # delta 0.5, weight 0.5
    # x = 1 - (1 * 1 + 0.5 * 0.5) / 2 = 0.375
    assert changed and float(state["global.w"]) == pytest.approx(0.375) and int(state["buffered"]) == 0


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff"])
def test_async_run_and_resume_with_updates_in_flight(repo, tmp_path, strategy):
    cfg = load_config(repo / f"configs/tiny_{strategy}.yaml")
    ref = run(cfg, tmp_path / "ref")
    rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(cfg.fl.rounds + 1))
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert any(c["staleness"] > 0 for r in rows for c in r["client_stats"])  # no barrier: stale updates happen
    assert [r["sim_time_s"] for r in rows] == sorted(r["sim_time_s"] for r in rows)

    class Crash(Exception):
        pass

    def crash_after_two(row):
        if row["round"] == 2:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashed", on_round=crash_after_two)
    resumed = run(cfg, tmp_path / "crashed", resume=True)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]

    assert strip(read_jsonl(tmp_path / "crashed" / "metrics.jsonl")) == strip(rows)
    assert resumed["final_eval_loss"] == ref["final_eval_loss"]


def test_sync_deadline_drops_stragglers(repo, tmp_path):
    base = load_config(repo / "configs/tiny_fedasync.yaml", ["fl.strategy=fedavg", "fl.rounds=2"])
    full = run(base, tmp_path / "all")
    times = [c["t_down_s"] + c["t_comp_s"] + c["t_up_s"] for c in read_jsonl(tmp_path / "all" / "metrics.jsonl")[1]["client_stats"]]
    deadline = sorted(times)[len(times) // 2]  # the median client's round time
    cut = load_config(repo / "configs/tiny_fedasync.yaml", ["fl.strategy=fedavg", "fl.rounds=2", f"fl.deadline_s={deadline}"])
    run(cut, tmp_path / "deadline")
    row = read_jsonl(tmp_path / "deadline" / "metrics.jsonl")[1]
    assert row["dropped"] and len(row["clients"]) + len(row["dropped"]) == 6
    assert row["round_time_s"] == pytest.approx(deadline)
    assert full["sim_time_s"] > row["sim_time_s"]
