"""EdgeLAM on Flower: records carry a trip exactly, malformed replies and non-synchronous schemes are
refused, and a real local deployment (SuperLink + 2 SuperNodes as processes) gives the simulator's run."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.cli.config_utils import load_and_validate
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgelam.cli_flower import flower_app, local, make_app
from edgelam.config import ConfigError, TrainConfig
from edgelam.config_load import load_config
from edgelam.fl.client import ClientUpdate
from edgelam.fl.executor import ClientResult, ClientWork
from edgelam.flower.app import FlowerExecutor, check_strategy
from edgelam.flower.records import RecordError, records_result, records_work, result_records, work_records
from edgelam.privacy.dpsgd import DPSGD
from edgelam.store import read_jsonl

OVERRIDES = ["fl.rounds=2", "threads=1", "data.num_clients=2", "eval.generate=0"]
ROW_KEYS = ("round", "sim_time_s", "round_time_s", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total",
            "energy_j")


def _state(seed: int) -> dict[str, torch.Tensor]:
    """An adapter-like dict in every dtype a trip may carry, an empty and a 0-d tensor among them."""
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(8, 4, generator=g).bfloat16(),
            "b.half": torch.randn(3, generator=g).half(), "c.count": torch.tensor(7), "d.empty": torch.zeros(0, 5)}


def _wire(rd: RecordDict) -> RecordDict:
    """``rd`` as it leaves one process and is rebuilt in another: deflated objects, inflated."""
    objects = get_all_nested_objects(rd)
    back = inflate_object_from_contents(rd.object_id, {i: o.deflate() for i, o in objects.items()})
    assert isinstance(back, RecordDict)
    return back


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _work(client: int = 0, ifca: bool = True) -> ClientWork:
    train = TrainConfig(local_steps=2, lr=1e-3, max_grad_norm=None, schedule="cosine")
    return ClientWork(client, 3, "c1", _state(1), _state(2), {"c0": _state(3), "c1": _state(4)} if ifca else None,
                      {"layer.q_proj": torch.randn(8, 8)}, 2**61 + 5, train, 0.01, DPSGD(1.1, 0.5) if ifca else None)


def _result(client: int = 0) -> ClientResult:
    update = ClientUpdate(client, _state(5), 17, 2.718281828459045, 3, 480, 1.25e9 + 1 / 3, "c1", frozenset({"head.w"}),
                          ((0.25, 1.1, 3), (0.5, 0.9, 2)))
    return ClientResult(update, _state(4), 3.5e7)


def test_records_carry_work_and_result_exactly():
    for work in (_work(), _work(ifca=False)):
        back, config = records_work(_wire(work_records(work, '{"seed": 0}')))
        assert config == '{"seed": 0}'
        assert (back.client, back.version, back.name, back.seed, back.train, back.prox_mu, back.dpsgd) == (
            work.client, work.version, work.name, work.seed, work.train, work.prox_mu, work.dpsgd)
        assert _same(back.start, work.start) and _same(back.payload, work.payload)
        assert _same(back.base_delta, work.base_delta)
        assert (back.candidates is None) == (work.candidates is None)
        assert list(back.candidates or {}) == list(work.candidates or {})
        assert all(_same((back.candidates or {})[n], a) for n, a in (work.candidates or {}).items())
    res = _result()
    got = records_result(_wire(result_records(res)), client=0)
    assert got.probe_flops == res.probe_flops and _same(got.start, res.start)
    assert _same(got.update.state, res.update.state)
    assert {**vars(got.update), "state": None} == {**vars(res.update), "state": None}


def test_malformed_replies_are_refused():
    good = result_records(_result())
    with pytest.raises(RecordError, match="client 0's reply has no 'state' record"):
        records_result(RecordDict({k: v for k, v in good.items() if k != "state"}), client=0)
    with pytest.raises(RecordError, match="carries client 0's result"):
        records_result(good, client=1)
    bad = RecordDict(dict(good.items()))
    bad["result"] = ConfigRecord({**dict(good["result"]), "num_samples": "17"})
    with pytest.raises(RecordError, match=r"\['num_samples'\] is str '17', expected int"):
        records_result(bad)
    arr = good["state"]["a.lora_A.weight"]
    arr.data = arr.data[:-4]
    with pytest.raises(RecordError, match=r"'a.lora_A.weight'\]: 124 bytes for a torch.float32 tensor of shape \[4, 8\]"):
        records_result(good)


class _Grid:
    """A Grid whose SuperNodes answer in this process: node 10 + p serves partition p of 2."""

    def __init__(self, answer) -> None:
        self.answer, self.inbox = answer, {}

    def get_node_ids(self) -> list[int]:
        return [11, 10]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's own Grid does
            if m.metadata.message_type == "query":
                part = ConfigRecord({"partition-id": m.metadata.dst_node_id - 10, "num-partitions": 2})
                self.inbox[m.object_id] = Message(RecordDict({"node": part}), reply_to=m)
            else:
                self.inbox[m.object_id] = Message(self.answer(records_work(m.content)[0]), reply_to=m)
        return [m.object_id for m in messages]

    def pull_messages(self, ids):
        return [self.inbox.pop(i) for i in list(ids) if i in self.inbox]


def test_executor_maps_clients_to_nodes_and_refuses_bad_replies(tmp_path, monkeypatch):
    for key in ("_run_id", "_node_id", "_task_id"):  # a ServerApp process has these; a Message needs them
        monkeypatch.setattr(TaskIdentity, key, 1)
    trips = tmp_path / "flower_trips.jsonl"
    ex = FlowerExecutor(_Grid(lambda w: result_records(_result(w.client))), "{}", trips)
    results = ex.run([_work(0), _work(1), _work(2)])
    assert [r.update.client for r in results] == [0, 1, 2] and _same(results[2].update.state, _result().update.state)
    lines = read_jsonl(trips)
    assert [(t["client"], t["node"]) for t in lines] == [(0, 10), (1, 11), (2, 10)]  # client k -> partition k mod 2
    assert all(t["round"] == 3 and t["seconds"] > 0 and t["bytes_down"] > t["bytes_up"] > 0 for t in lines)
    ex.grid = _Grid(lambda w: RecordDict({"result": result_records(_result(w.client))["result"]}))
    with pytest.raises(RecordError, match="client 1's reply has no 'state'"):
        ex.run([_work(1)])
    ex.grid = _Grid(lambda w: Error(code=0, reason="out of memory"))
    with pytest.raises(RuntimeError, match="client 0 on SuperNode 10: the ClientApp failed: out of memory"):
        ex.run([_work(0)])


@pytest.mark.parametrize("strategy, kind", [("fedasync", "an asynchronous"), ("hierfavg", "a hierarchical"),
                                            ("sfl_v1", "a split-learning")])
def test_non_synchronous_schemes_are_refused(repo, strategy, kind):
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"fl.strategy={strategy}", "eval.generate=0"])
    with pytest.raises(ConfigError, match=f"fl.strategy {strategy} is {kind} scheme .* on Flower use a synchronous"):
        check_strategy(cfg)


def test_flower_app_command_refuses_before_writing(repo, tmp_path):
    res = CliRunner().invoke(flower_app, ["app", str(repo / "configs" / "tiny.yaml"), "fl.strategy=fedbuff",
                                          "--out", str(tmp_path / "app")])
    assert res.exit_code == 2 and "fedbuff is an asynchronous scheme" in res.stderr
    assert not (tmp_path / "app").exists()


def test_the_app_template_is_what_flower_app_writes(repo, tmp_path):
    app = make_app(repo / "configs" / "tiny.yaml", [], tmp_path / "app")
    for name in ("pyproject.toml", "edgelam.yaml", "LICENSE", "README.md"):
        assert (app / name).read_text() == (repo / "flower_app" / name).read_text(), name
    config, warnings = load_and_validate(app / "pyproject.toml")  # Flower's own check of an app
    assert config["tool"]["flwr"]["app"]["config"]["run-dir"] == "runs/tiny-flower" and not warnings


def test_local_deployment_matches_the_simulator(repo, tmp_path):
    from edgelam.lifecycle import run

    config = repo / "configs" / "tiny.yaml"
    with ThreadPoolExecutor(1) as pool:  # the deployment mostly waits on its processes: simulate meanwhile
        deployed = pool.submit(local, config, OVERRIDES, tmp_path / "flower", nodes=2, timeout_s=240, echo=False)
        run(load_config(config, OVERRIDES), tmp_path / "sim")
        summary = deployed.result()
    assert not psutil.Process().children(recursive=True)  # SuperLink, SuperNodes and their apps are gone
    sim, fl = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("sim", "flower"))
    assert sim.keys() == fl.keys() and all(torch.allclose(sim[k], fl[k], rtol=0, atol=1e-6) for k in sim)
    rows = [read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("sim", "flower")]
    assert len(rows[1]) == 3 and [[r[k] for k in ROW_KEYS] for r in rows[0]] == [[r[k] for k in ROW_KEYS] for r in rows[1]]
    assert summary["rounds"] == 2 and math.isclose(summary["final_eval_loss"], rows[0][-1]["eval_loss"], abs_tol=1e-6)
    trips = read_jsonl(tmp_path / "flower" / "flower_trips.jsonl")
    assert sorted((t["round"], t["client"]) for t in trips) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(t["seconds"] > 0 and t["bytes_down"] > 0 and t["bytes_up"] > 0 for t in trips)
    nodes = {k: {t["node"] for t in trips if t["client"] == k} for k in (0, 1)}
    assert len(nodes[0]) == len(nodes[1]) == 1 and nodes[0] != nodes[1]  # one SuperNode each, a different one
