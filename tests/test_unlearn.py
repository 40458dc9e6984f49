"""Federated unlearning (privacy/unlearn.py, privacy/mia.py): the exact methods are bit-identical to
retraining from scratch, the membership-inference attack sees a memorising client, FedEraser and the
cluster method, and the command's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgelam.cli import app
from edgelam.config_load import config_to_dict, load_config
from edgelam.fl.strategies import build_strategy
from edgelam.fl.strategies.base import get_prefixed, replace_prefixed
from edgelam.lifecycle import run
from edgelam.privacy.mia import auc_mann_whitney
from edgelam.privacy.unlearn import Cost, Source, UnlearnError, UnlearnOptions, calibrate, check_method, cluster, open_run
from edgelam.privacy.unlearn import unlearn, with_excluded
from edgelam.rundir import CHECKPOINT, RunFolder, RunFolderError, kept_rounds, load_checkpoint, load_updates, read_rows
from edgelam.rundir import round_file, updates_file
from edgelam.store import Purpose, rng_for

CFG = "configs/tiny_unlearn.yaml"
K = 3  # the memorising client of configs/tiny_unlearn.yaml
# the exactness tests need no memorisation: the tiny model, short rounds, evaluation at the end only
CHEAP = ["model.name=tiny", "model.lora.target_modules=[q_proj,v_proj]", "train.local_steps=2", "eval.every=9"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / CHECKPOINT)[0].state


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _peft(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_rows(folder / "metrics.jsonl")[0]]


# --- pure parts, worked out by hand ---


def test_auc_is_the_mann_whitney_statistic():
    # members score 3, 2; non-members 1, 2: pairs (3>1) (3>2) (2>1) and a tie (2=2) counted half: 3.5 / 4
    assert auc_mann_whitney([3.0, 2.0], [1.0, 2.0]) == 0.875
    assert auc_mann_whitney([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert auc_mann_whitney([0.0], [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="non-members"):
        auc_mann_whitney([1.0], [])


def test_federaser_calibration_keeps_the_stored_norm_and_the_new_direction():
    start = {"w": torch.tensor([1.0, 1.0]), "frozen": torch.tensor([2.0])}
    trained = {"w": torch.tensor([4.0, 5.0]), "frozen": torch.tensor([2.0])}  # U^ = (3, 4): norm 5
    old_start = {"w": torch.zeros(2), "frozen": torch.tensor([0.0])}
    old_received = {"w": torch.tensor([0.0, 2.0]), "frozen": torch.tensor([1.0])}  # ||U|| = 2
    out = calibrate(start, trained, old_start, old_received)
    assert torch.allclose(out["w"], torch.tensor([1.0 + 1.2, 1.0 + 1.6]))  # start + 2 * (3, 4) / 5
    assert torch.equal(out["frozen"], start["frozen"])  # no calibration direction: unchanged


def test_cost_relative_to_retraining():
    rel = Cost(5.0, 10, 30, 1.0).relative(Cost(10.0, 20, 20, 0.0))
    assert rel == {"sim_time_s": 0.5, "bytes_up": 0.5, "bytes_down": 1.5, "energy_j": None, "bytes": 1.0}


@pytest.mark.parametrize("config, overrides, message", [
    ("configs/tiny_clustered.yaml", [], "'ifca' forms clusters from every client's updates"),
    ("configs/tiny_clustered.yaml", ["fl.strategy=cfl"], "'cfl' forms clusters from every client's updates"),
    ("configs/tiny.yaml", [], "needs a clustered run with clusters fixed by device resources"),
])
def test_cluster_method_refuses_clusters_formed_from_updates(tmp_path, config, overrides, message):
    src = Source(tmp_path, load_config(config, overrides), [], {})
    with pytest.raises(UnlearnError, match=message):
        check_method(src, "cluster")


# --- a memorising client (configs/tiny_unlearn.yaml: rescluster, every method applies) ---


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    base = tmp_path_factory.mktemp("unlearn")
    run(load_config(CFG), base / "run")
    report = unlearn(base / "run", K, ["all"], base / "out")
    return base, report


def test_run_folder_keeps_round_checkpoints_and_updates(memorised, plain):
    base, _ = memorised
    folder, cfg = base / "run", load_config(CFG)
    assert kept_rounds(folder) == [0, 1, 2, 3]
    assert _identical(load_checkpoint(folder / round_file(3))[0].state, _state(folder))
    rows = read_rows(folder / "metrics.jsonl")[0]
    assert all("_updates" not in r for r in rows)
    first = load_checkpoint(folder / round_file(0))[0].state
    names = build_strategy(cfg).assignment(first, cfg.data.num_clients)
    stored = load_updates(folder / updates_file(1))
    assert sorted(stored) == rows[1]["clients"]
    for k, (start, got) in stored.items():
        assert _identical(start, get_prefixed(first, names[k])) and not _identical(got, start)
    plain_folder = plain[0]  # the settings off: nothing kept beyond the one checkpoint
    assert not (plain_folder / "state" / "rounds").exists() and not (plain_folder / "state" / "updates").exists()


def test_fork_refuses_a_client_that_took_part_and_any_other_change(memorised, tmp_path):
    base, _ = memorised
    without_k = config_to_dict(with_excluded(load_config(CFG), [K]))
    with pytest.raises(RunFolderError, match="client 3 took part in round 1"):
        RunFolder.fork(base / "run", 1, tmp_path / "a", without_k)
    with pytest.raises(RunFolderError, match="train.lr: 0.02 -> 0.1"):
        RunFolder.fork(base / "run", 0, tmp_path / "b", config_to_dict(load_config(CFG, ["train.lr=0.1"])))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rollback_is_retraining_when_the_client_joined_in_round_1(memorised):
    base, report = memorised
    assert report["first_round"] == 1 and set(report["methods"]) == {"retrain", "rollback", "federaser", "cluster"}
    out = base / "out"
    assert _identical(_state(out / "rollback"), _state(out / "retrain"))
    assert _rows(out / "rollback") == _rows(out / "retrain")  # every metric of every round but the wall time


def test_membership_inference_sees_the_memorised_client_and_not_after_retraining(memorised):
    _, report = memorised
    before, after = report["original"], report["methods"]["retrain"]
    assert before["mia_auc"] > 0.75, before
    assert abs(after["mia_auc"] - 0.5) < abs(before["mia_auc"] - 0.5)
    assert after["forget_loss"] > before["forget_loss"] + 1.0  # the retrained model never saw client 3's sums


def test_federaser_forgets_for_less_than_retraining(memorised):
    base, report = memorised
    fed, ref = report["methods"]["federaser"], report["methods"]["retrain"]
    assert fed["cost"]["sim_time_s"] < ref["cost"]["sim_time_s"] and fed["cost"]["energy_j"] < ref["cost"]["energy_j"]
    assert fed["forget_loss"] > report["original"]["forget_loss"] + 1.0
    assert all((Path(p) / "adapter_model.safetensors").is_file() for p in fed["adapters"].values())


def test_cluster_method_retrains_one_cluster_and_keeps_the_others(memorised):
    base, report = memorised
    cfg = load_config(CFG)
    mine = build_strategy(cfg).assignment(_state(base / "run"), cfg.data.num_clients)[K]
    saved = {name: _peft(Path(p)) for name, p in report["methods"]["cluster"]["adapters"].items()}
    assert len(saved) == 2
    for name, adapter in saved.items():
        # K's cluster as retraining without K made it (fl.fraction 1: no other cluster touches it), the other as it was
        like = base / "out" / "retrain" if name == mine else base / "run"
        assert _identical(adapter, _peft(like / "adapters" / name)), name
    assert not _identical(saved[mine], _peft(base / "run" / "adapters" / mine))
    cost = report["methods"]["cluster"]["cost_vs_reference"]
    assert cost["sim_time_s"] < 1 and cost["bytes"] < 1 and cost["energy_j"] < 1


def test_a_client_alone_in_its_cluster_leaves_the_initial_adapter(tmp_path):
    cfg = load_config(CFG, [*CHEAP, "fl.rounds=1", "fl.cluster.num_clusters=4"])  # one client per cluster
    run(cfg, tmp_path / "run")
    first, last = load_checkpoint(tmp_path / "run" / round_file(0))[0].state, _state(tmp_path / "run")
    mine = build_strategy(cfg).assignment(first, 4)[K]
    got = cluster(open_run(tmp_path / "run"), K, tmp_path / "out", UnlearnOptions())
    assert got.cost == Cost() and not (tmp_path / "out" / "run").exists()  # nothing to retrain
    assert _identical(got.state, replace_prefixed(last, mine, get_prefixed(first, mine)))


def test_rollback_is_retraining_when_the_client_joined_later(tmp_path):
    """fl.fraction < 1: a seed whose round 1 leaves client 3 out and whose round 2 takes it."""
    def picks(seed: int) -> list[list[int]]:
        cfg = load_config(CFG, [*CHEAP, "fl.strategy=fedavg", "fl.fraction=0.5", "fl.rounds=3", f"seed={seed}"])
        return [build_strategy(cfg).select(r, 4, rng_for(seed, Purpose.SELECT, r)) for r in (1, 2, 3)]

    seed = next(s for s in range(100) if K not in picks(s)[0] and K in picks(s)[1])
    run(load_config(CFG, [*CHEAP, "fl.strategy=fedavg", "fl.fraction=0.5", "fl.rounds=3", f"seed={seed}"]), tmp_path / "run")
    report = unlearn(tmp_path / "run", K, ["rollback"], tmp_path / "out")
    assert report["first_round"] == 2
    assert _identical(_state(tmp_path / "out" / "rollback"), _state(tmp_path / "out" / "retrain"))
    assert _rows(tmp_path / "out" / "rollback") == _rows(tmp_path / "out" / "retrain")
    rel = report["methods"]["rollback"]["cost_vs_reference"]
    assert rel["sim_time_s"] < 1 and rel["bytes"] < 1  # round 1 is not trained again


# --- the command's errors ---


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """configs/tiny.yaml, one round of one client: no round checkpoints, no stored updates, fedavg."""
    out = tmp_path_factory.mktemp("plain") / "run"
    run(load_config("configs/tiny.yaml", ["fl.rounds=1", "fl.fraction=0.34", "train.local_steps=1", "eval.generate=0",
                                          "threads=1"]), out)
    (took,) = read_rows(out / "metrics.jsonl")[0][1]["clients"]
    return out, took, min({0, 1, 2} - {took})


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a finished EdgeLAM run folder"),
    ("out_of_range", "--client 7 is out of range"),
    ("never", "never took part"),
    ("rollback", "privacy.unlearn.checkpoints: every"),
    ("federaser", "privacy.unlearn.store_updates: true"),
    ("cluster", "fl.strategy: rescluster"),
    ("nonsense", "unknown unlearning method 'nonsense'"),
])
def test_cli_errors_name_the_problem(plain, tmp_path, case, message):
    folder, took, never = plain
    args = {"missing": [str(tmp_path / "nope"), "--client", "0"], "out_of_range": [str(folder), "--client", "7"],
            "never": [str(folder), "--client", str(never)]}.get(case, [str(folder), "--client", str(took), "--method", case])
    result = CliRunner().invoke(app, ["unlearn", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()  # refused before anything ran
