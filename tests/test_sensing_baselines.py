"""From-scratch activity recognizers: output shapes and parameter counts, seeded training, both
beat chance on generated empty-vs-walking windows, ``evaluate`` against a hand computation, and
clear errors on wrong shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from edgelam.sensing.baselines import (
    CNNClassifier,
    GRUClassifier,
    count_parameters,
    evaluate,
    fit,
    latency_ms,
)
from edgelam.sensing.data import relative
from edgelam.sensing.synthetic import RoomConfig, generate_set

CLASSES = ("empty", "walking")
FRAMES = 100
MODELS = (CNNClassifier, GRUClassifier)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def windows(per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    h, y = generate_set(RoomConfig(frames=FRAMES), per_class, np.random.default_rng(seed), CLASSES)
    return torch.from_numpy(relative(np.abs(h).reshape(len(h), FRAMES, -1))), torch.from_numpy(y)


@pytest.fixture(scope="module")
def sets() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = windows(12, 1)
    xe, ye = windows(8, 2)
    return x, y, xe, ye


def build(cls: type[nn.Module], features: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(features, classes)


@pytest.mark.parametrize("cls", MODELS)
def test_output_shapes(cls: type[nn.Module]) -> None:
    model = build(cls, 120, 5)
    for frames in (100, 7, 1):
        assert model(torch.randn(3, frames, 120)).shape == (3, 5)


def test_parameter_counts() -> None:
    # conv 120 -> 32 -> 32 -> 32 (kernel 5) + head; GRU gates 3 x (in + hidden + 2 biases) x hidden + head
    assert count_parameters(CNNClassifier(120, 5)) == (120 * 32 * 5 + 32) + 2 * (32 * 32 * 5 + 32) + 32 * 5 + 5
    assert count_parameters(GRUClassifier(120, 5)) == 3 * (120 + 64 + 2) * 64 + 64 * 5 + 5
    model = CNNClassifier(120, 5)
    model.head.requires_grad_(False)
    assert count_parameters(model) == count_parameters(CNNClassifier(120, 5)) - (32 * 5 + 5)


@pytest.mark.parametrize("cls", MODELS)
def test_fit_reproducible_by_seed(cls: type[nn.Module], sets: tuple[Tensor, ...]) -> None:
    x, y = sets[0], sets[1]
    runs = []
    for fit_seed in (3, 3, 4):
        model = build(cls, x.shape[2], 2)
        runs.append((fit(model, x, y, epochs=2, batch_size=8, seed=fit_seed), model))
    (a, ma), (b, mb), (c, _) = runs
    assert len(a) == 2 and a == b and a != c
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    assert not ma.training


@pytest.mark.parametrize("cls", MODELS)
def test_beats_chance_on_empty_vs_walking(cls: type[nn.Module], sets: tuple[Tensor, ...]) -> None:
    x, y, xe, ye = sets
    model = build(cls, x.shape[2], 2)
    losses = fit(model, x, y, epochs=12, batch_size=8, lr=3e-3, seed=0)
    assert losses[-1] < 0.5 * losses[0]
    m = evaluate(model, xe, ye, CLASSES)
    assert m["accuracy"] >= 0.8 and m["macro_f1"] >= 0.75  # chance: 0.5 on 16 held-out windows


class Passthrough(nn.Module):
    """Windows (N, 1, C) -> their one frame as the logits."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0, :]


def test_evaluate_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])  # predicted 0, 1, 1, 2; class 2 never present
    # class 0: tp 1 fp 0 fn 1 -> F1 2/3; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2 left out
    want_loss = float(nn.functional.cross_entropy(logits, labels))
    whole = evaluate(Passthrough(), logits.unsqueeze(1), labels, ("a", "b", "c"))
    for batch in (256, 3, 1):
        m = evaluate(Passthrough(), logits.unsqueeze(1), labels, ("a", "b", "c"), batch_size=batch)
        assert m["accuracy"] == 0.5
        assert math.isclose(m["macro_f1"], (2 / 3 + 1 / 2) / 2)
        assert math.isclose(m["loss"], want_loss, rel_tol=1e-6)
    assert evaluate(Passthrough(), logits.unsqueeze(1), labels, 3) == whole  # classes by number


@pytest.mark.parametrize("cls", MODELS)
def test_wrong_shapes_are_clear_errors(cls: type[nn.Module]) -> None:
    model = build(cls, 120, 3)
    with pytest.raises(ValueError, match=r"\(batch, frames >= 1, 120\)"):
        model(torch.randn(4, 100))
    with pytest.raises(ValueError, match="120"):
        model(torch.randn(4, 100, 60))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(4, 100, 120, dtype=torch.long))
    x = torch.randn(4, 10, 120)
    with pytest.raises(ValueError, match=r"labels of shape \(4,\)"):
        fit(model, x, torch.tensor([0, 1, 2]), epochs=1)
    with pytest.raises(ValueError, match="integer labels"):
        fit(model, x, torch.zeros(4), epochs=1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fit(model, x, torch.tensor([0, 1, 2, 3]), epochs=1)
    with pytest.raises(ValueError, match="2 classes were named"):
        evaluate(model, x, torch.tensor([0, 1, 2, 0]), CLASSES)
    with pytest.raises(ValueError, match="120"):
        evaluate(model, torch.randn(4, 10, 30), torch.tensor([0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match="classes >= 2"):
        cls(120, 1)


def test_latency_is_positive() -> None:
    model = CNNClassifier(120, 5)
    assert latency_ms(model, torch.randn(FRAMES, 120), repeats=2) > 0
    assert latency_ms(model, torch.randn(2, FRAMES, 120), repeats=1) > 0
