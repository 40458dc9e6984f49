"""The seams: no import cycle, the registry and config agree on names and drivers, one reduce chosen
by config, the uplink chain, named random streams, settings a driver would ignore are refused."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from edgelam.config import STRATEGY_DRIVERS, ConfigError
from edgelam.config_load import config_from_dict
from edgelam.fl.aggregate import REDUCERS, coordinate_median, trimmed_mean, weighted_average
from edgelam.fl.strategies import STRATEGIES, build_strategy
from edgelam.fl.transforms import Clip, HalfPrecision, Trip, delta_norm
from edgelam.store import Purpose

SRC = Path(__file__).resolve().parents[1] / "src" / "edgelam"


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every edgelam module -> the edgelam modules it imports anywhere (top level or inside functions)."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgelam"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("edgelam")]
            graph[m] |= {n for n in names if n in modules and n != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "edgelam.fl.strategies" in graph["edgelam.lifecycle"]  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_registry_and_config_agree_on_names_and_drivers():
    assert set(STRATEGIES) == set(STRATEGY_DRIVERS)
    for name, cls in STRATEGIES.items():
        assert cls.driver == STRATEGY_DRIVERS[name], name
        strategy = build_strategy(config_from_dict(_valid_for(name)))
        assert strategy.name == name and strategy.driver == cls.driver


def _valid_for(name: str) -> dict:
    cfg: dict = {"fl": {"strategy": name}}
    if name == "fedprox":
        cfg["train"] = {"prox_mu": 0.01}
    if STRATEGY_DRIVERS[name] == "split":
        cfg["data"] = {"source": "sst2"}
    return cfg


def test_reducers_by_hand():
    a, b, c = ({"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([6.0, -4.0])})
    assert torch.equal(weighted_average([a, b], [1, 3])["w"], torch.tensor([1.75, 2.5]))
    assert torch.equal(coordinate_median([a, b, c], [1, 1, 1])["w"], torch.tensor([2.0, 0.0]))
    assert torch.equal(coordinate_median([a, b], [1, 1])["w"], torch.tensor([1.5, 5.0]))
    five = [{"w": torch.tensor([x])} for x in (100.0, 1.0, 2.0, 3.0, -50.0)]
    assert torch.equal(trimmed_mean(five, [1] * 5, 0.2)["w"], torch.tensor([2.0]))  # drops 100 and -50
    with pytest.raises(ValueError, match="same keys"):
        weighted_average([a, {"v": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([a, b], [0, 0])
    assert set(REDUCERS) == {"mean", "median", "trimmed_mean", "krum", "multi_krum"}


def test_aggregator_reaches_every_site():
    cfg = config_from_dict({"fl": {"strategy": "ifca", "aggregator": "median"}})
    assert build_strategy(cfg).reduce is coordinate_median
    split = config_from_dict({"fl": {"strategy": "sfl_v2", "aggregator": "median"}, "data": {"source": "sst2"}})
    strategy = build_strategy(split)
    dev, srv = strategy.combine([{"x": torch.tensor([1.0])}, {"x": torch.tensor([5.0])}, {"x": torch.tensor([2.0])}],
                                [{"y": torch.tensor([7.0])}], [1.0, 1.0, 1.0])
    assert float(dev["x"]) == 2.0 and float(srv["y"]) == 7.0  # SFL-V2: the shared server copy as trained


def test_clip_scales_the_delta_by_hand():
    start = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    update = {"a": torch.tensor([4.0, 5.0]), "b": torch.tensor([0.0])}  # delta (3, 4, 0): norm 5
    assert delta_norm(update, start) == 5.0
    clipped = Clip(1.0)(update, start, Trip(0, 1))
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.8])) and delta_norm(clipped, start) == pytest.approx(1.0)
    assert Clip(10.0)(update, start, Trip(0, 1)) is update
    half = HalfPrecision()(update, start, Trip(0, 1))
    assert half["a"].dtype == torch.float16


def test_float16_uplink_halves_the_bytes_up(tmp_path):
    from edgelam.lifecycle import run

    rows = {}
    for name, uplink in (("f32", []), ("f16", ["float16"]), ("clip", ["clip"])):
        cfg = config_from_dict({"fl": {"rounds": 1, "uplink": uplink, "clip_norm": 1e-4}, "eval": {"every": 1},
                                "data": {"examples_per_task": 20}, "train": {"local_steps": 1}})
        run(cfg, tmp_path / name)
        rows[name] = [__import__("json").loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    f32, f16 = rows["f32"][1], rows["f16"][1]
    # the tensor data halves; the safetensors header (names, shapes, offsets) stays
    assert f16["bytes_up"] < 0.55 * f32["bytes_up"] and f16["bytes_down"] == f32["bytes_down"]
    # clipping every delta to 1e-4 keeps the global adapter near its start: the loss barely moves
    assert abs(rows["clip"][1]["eval_loss"] - rows["clip"][0]["eval_loss"]) < abs(f32["eval_loss"] - rows["f32"][0]["eval_loss"])


@pytest.mark.parametrize("bad, key", [
    ({"fl": {"strategy": "fedbuff", "deadline_s": 10}}, "fl.deadline_s"),
    ({"fl": {"strategy": "hierfavg", "deadline_s": 10}}, "fl.deadline_s"),
    ({"fl": {"strategy": "sfl_v1", "deadline_s": 10}, "data": {"source": "sst2"}}, "fl.deadline_s"),
    ({"fl": {"strategy": "sfl_v1", "fraction": 0.5}, "data": {"source": "sst2"}}, "fl.fraction"),
    ({"fl": {"strategy": "sfl_v1"}, "train": {"prox_mu": 0.1}, "data": {"source": "sst2"}}, "train.prox_mu"),
    ({"fl": {"strategy": "sfl_v1"}, "net": {"server_tier": "cloud"}, "data": {"source": "sst2"}}, "net.server_tier"),
    ({"fl": {"strategy": "sfl_v1"}, "eval": {"generate": 2}, "data": {"source": "sst2"}}, "eval.generate"),
    ({"fl": {"strategy": "sfl_v1"}, "eval": {"client_heldout": True}, "data": {"source": "sst2"}}, "eval.client_heldout"),
    ({"fl": {"strategy": "sfl_v1", "uplink": ["clip"]}, "data": {"source": "sst2"}}, "fl.uplink"),
    ({"fl": {"strategy": "sfl_v1"}, "model": {"dtype": "bfloat16"}, "data": {"source": "sst2"}}, "model.dtype"),
    ({"net": {"path_loss": "macro", "carrier_ghz": 28}}, "net.carrier_ghz"),
    ({"fl": {"strategy": "hierfavg"}, "train": {"local_epochs": 1}}, "train.local_epochs"),
    ({"fl": {"uplink": ["gzip"]}}, "fl.uplink[0]"),
    ({"fl": {"aggregator": "bulyan"}}, "fl.aggregator"),
    ({"seed": -1}, "seed"),
])
def test_settings_a_driver_would_ignore_are_refused(bad, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(bad)


def test_defaults_resolve_per_driver():
    assert config_from_dict({}).eval.client_heldout is True
    assert config_from_dict({"fl": {"strategy": "sfl_v1"}, "data": {"source": "sst2"}}).eval.client_heldout is False
    assert config_from_dict({"net": {"path_loss": "uma"}}).net.carrier_ghz == 3.5


def test_random_purposes_are_named_and_the_synthetic_stream_is_apart():
    values = [p.value for p in Purpose]
    assert len(values) == len(set(values))  # aliases (split / async) are the same member, not two
    assert Purpose.SYNTHETIC not in (Purpose.FADING, Purpose.SELECT, Purpose.TRAIN)
    from edgelam.data.synthetic import generate

    a = generate("sort", 3, seed=0, stream=1)
    b = generate("sort", 3, seed=0, stream=1)
    assert a == b
