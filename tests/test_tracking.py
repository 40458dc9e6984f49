"""report.*: TensorBoard and MLflow hold exactly the rows metrics.jsonl holds, a resume continues the
same MLflow run without logging a round twice; the progress registry reports client trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelam import progress
from edgelam.config import ConfigError
from edgelam.config_load import load_config
from edgelam.lifecycle import run
from edgelam.store import read_jsonl
from edgelam.tracking import STATE, params, scalars

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _cfg(repo: Path, rounds: int, *extra: str):
    """tiny.yaml with both trackers on; MLflow's store defaults to mlruns/ beside the run folder."""
    return load_config(repo / "configs" / "tiny.yaml", [f"fl.rounds={rounds}", "threads=1", "eval.generate=0",
                                                       "report.tensorboard=true", "report.mlflow=true", *extra])


def _tensorboard(path: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's server reads the folder (restarts purged)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def _mlflow(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _expected(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["round"], r[key]) for r in rows if r.get(key) is not None]


def test_scalars_and_params_by_hand():
    row = {"round": 2, "eval_loss": 1.5, "train_loss": None, "bytes_up": 10, "ok": True, "clients": [0, 1],
           "client_stats": [{"client": 0}], "eval_tasks": {"a b": {"adapter": "global", "loss": 2.0}}, "x": float("nan")}
    assert scalars(row) == {"round": 2.0, "eval_loss": 1.5, "bytes_up": 10.0, "eval_tasks/a b/loss": 2.0}
    assert scalars({"t": {"é!": 1}}, "summary/") == {"summary/t/é_": 1.0}
    got = params({"fl": {"rounds": 2, "uplink": ["clip"]}, "name": "tiny", "data": {"path": None, "files": "x" * 7000}})
    assert got == {"fl.rounds": "2", "fl.uplink": '["clip"]', "name": "tiny", "data.path": "null", "data.files": "x" * 6000}


def test_tensorboard_and_mlflow_hold_the_rows(repo, tmp_path):
    out = tmp_path / "run"
    summary = run(_cfg(repo, 2), out)  # the store: tmp_path / "mlruns"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]

    tb = _tensorboard(out / "tensorboard")
    assert tb["eval_loss"] == _expected(rows, "eval_loss")
    assert tb["train_loss"] == _expected(rows, "train_loss")  # round 0 trained nothing: no point
    assert tb["eval_tasks/capital/loss"] == [(r["round"], r["eval_tasks"]["capital"]["loss"]) for r in rows]
    assert not any(t.startswith("client_stats") for t in tb) and "round" not in tb
    by_time = _tensorboard(out / "tensorboard" / "sim_time")
    assert by_time["sim_time_ms/eval_loss"] == [(round(r["sim_time_s"] * 1000), r["eval_loss"]) for r in rows]

    run_id = json.loads((out / STATE).read_text())["mlflow_run_id"]
    for key in ("eval_loss", "train_loss", "bytes_up_total", "sim_time_s"):
        assert _mlflow(tmp_path, run_id, key) == _expected(rows, key)
    assert _mlflow(tmp_path, run_id, "eval_tasks/reverse/ppl") == [(r["round"], r["eval_tasks"]["reverse"]["ppl"]) for r in rows]
    assert _mlflow(tmp_path, run_id, "summary/final_eval_loss") == [(2, summary["final_eval_loss"])]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params["fl.rounds"] == "2" and got.data.params["model.name"] == "tiny"
    assert client.get_experiment(got.info.experiment_id).name == "tiny"
    assert {f.path for f in client.list_artifacts(run_id, "adapter")} >= {"adapter/adapter_model.safetensors",
                                                                           "adapter/adapter_config.json"}


def test_resume_continues_the_same_mlflow_run(repo, tmp_path):
    out = tmp_path / "run"
    uri = f"report.mlflow_uri={(tmp_path / 'mlruns').as_uri()}"
    run(_cfg(repo, 1, uri), out)
    run_id = json.loads((out / STATE).read_text())["mlflow_run_id"]
    run(_cfg(repo, 2, uri), out, resume=True)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((out / STATE).read_text())["mlflow_run_id"] == run_id
    for key in ("eval_loss", "round", "wall_s"):  # each round once, with the row's own value
        assert _mlflow(tmp_path, run_id, key) == _expected(rows, key)
    assert [s for s, _ in _mlflow(tmp_path, run_id, "summary/rounds")] == [1, 2]
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_run(run_id).info.status == "FINISHED"
    # TensorBoard: the resumed writer rewrote round 1 under purge_step, so each round shows once
    assert _tensorboard(out / "tensorboard")["wall_s"] == _expected(rows, "wall_s")
    by_time = _tensorboard(out / "tensorboard" / "sim_time")["sim_time_ms/wall_s"]
    assert by_time == [(round(r["sim_time_s"] * 1000), r["wall_s"]) for r in rows]


def test_a_bad_mlflow_uri_is_named_before_the_model_loads(repo, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(repo, 1, "report.mlflow_uri=nosuch://host/x")
    with pytest.raises(ConfigError, match=r"report\.mlflow_uri nosuch://host/x"):
        run(cfg, out)
    assert not out.exists()  # the run never started: no half-made folder
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the store's folder would go
    with pytest.raises(ConfigError, match="report.mlflow_uri"):
        run(_cfg(repo, 1, f"report.mlflow_uri={(blocked / 'mlruns').as_uri()}"), out)


def test_progress_listeners_hear_trips():
    heard: list[tuple[str, int]] = []
    count = progress.TripCount()
    progress.trips_started(2)  # nobody listening: nothing happens
    with progress.listen(lambda e, v: heard.append((e, v))), progress.listen(count):
        progress.trips_started(3)
        progress.trip_done(4)
        progress.trip_done(1)
        assert (count.started, count.done, count.in_flight) == (3, 2, 1)
        count.new_round()  # the trip still in flight carries over (asynchronous schemes)
        assert (count.started, count.done) == (1, 0)
    progress.trip_done(0)
    assert heard == [("started", 3), ("done", 4), ("done", 1)]


def test_a_failing_listener_does_not_stop_the_report(caplog):
    heard: list[int] = []

    def broken(event: str, value: int) -> None:
        raise RuntimeError("display gone")

    with progress.listen(broken), progress.listen(lambda e, v: heard.append(v)):
        progress.trip_done(7)
    assert heard == [7] and "display gone" in caplog.text
