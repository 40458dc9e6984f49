"""Local training: the loss goes down, seeds reproduce, FedProx pulls towards the global adapter."""

import pytest
import torch

from edgelam.config import DataConfig, LoraConfig as LoraSettings, TrainConfig
from edgelam.data.build import build_federated_data
from edgelam.fl.client import local_train, lr_lambda
from edgelam.models.flops import flop_model
from edgelam.models.load import tiny_model
from edgelam.models.lora import attach_lora, get_adapter_state


@pytest.fixture
def setup(tiny):
    model = attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(r=4, dropout=0.0))
    data = build_federated_data(DataConfig(tasks=("reverse",), examples_per_task=16, num_clients=1, max_length=48),
                                tiny.tokenizer, seed=0)
    return model, data.clients[0].train, int(tiny.tokenizer.pad_token_id)


def _dist(a, b):
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def test_training_reduces_loss_and_is_reproducible(setup):
    model, data, pad = setup
    g = get_adapter_state(model)
    cfg = TrainConfig(local_steps=15, batch_size=4, lr=1e-2)
    u1 = local_train(model, g, data, cfg, 0.0, seed=7, pad_id=pad, fm=flop_model(model))
    u2 = local_train(model, g, data, cfg, 0.0, seed=7, pad_id=pad, fm=flop_model(model))
    assert all(torch.equal(u1.state[k], u2.state[k]) for k in g)
    again = local_train(model, u1.state, data, TrainConfig(local_steps=1, batch_size=16, lr=1e-12), 0.0, 0, pad, flop_model(model))
    first = local_train(model, g, data, TrainConfig(local_steps=1, batch_size=16, lr=1e-12), 0.0, 0, pad, flop_model(model))
    assert again.train_loss < first.train_loss  # the trained adapter fits the data better
    assert u1.steps == 15 and u1.tokens > 0 and u1.flops > 0


def test_grad_accum_and_epochs(setup):
    model, data, pad = setup
    g = get_adapter_state(model)
    u = local_train(model, g, data, TrainConfig(local_epochs=2, batch_size=2, grad_accum=2), 0.0, 0, pad, flop_model(model))
    assert u.steps == 2 * -(-len(data) // 4)


def test_fedprox_stays_closer_to_the_global_adapter(setup):
    model, data, pad = setup
    g = get_adapter_state(model)
    cfg = TrainConfig(local_steps=10, batch_size=4, lr=1e-2)
    free = local_train(model, g, data, cfg, 0.0, 1, pad, flop_model(model))
    prox = local_train(model, g, data, cfg, 10.0, 1, pad, flop_model(model))
    assert _dist(prox.state, g) < _dist(free.state, g)


def test_lr_schedules():
    assert lr_lambda("constant", 0, 10)(5) == 1.0
    warm = lr_lambda("linear", 2, 10)
    assert warm(0) == pytest.approx(1 / 3) and warm(1) == pytest.approx(2 / 3)
    assert warm(2) == pytest.approx(1.0) and warm(10) == pytest.approx(0.0)
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
