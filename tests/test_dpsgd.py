"""Sample-level DP-SGD (Abadi et al. 2016) on a client: per-example gradients exact (Opacus on the
tiny PEFT causal LM, torch.func on a model Opacus refuses), clipping, a noise-free step that is SGD
on the Poisson batch by hand, the noise's scale, reproducibility, what the trip reports, its FLOP
plan, and no hook left on the shared model."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from edgelam.config import DataConfig, LoraConfig as LoraSettings, TrainConfig
from edgelam.config_load import load_config
from edgelam.data.build import build_federated_data
from edgelam.fl.client import local_train, trip_steps
from edgelam.fl.driver import FLDriver
from edgelam.fl.executor import ClientWork, plan_trip, planned_train_flops
from edgelam.fl.rounds import make_work, uplink
from edgelam.models.flops import flop_model
from edgelam.models.load import tiny_model
from edgelam.models.lora import attach_lora, get_adapter_state, set_adapter_state
from edgelam.privacy.dpsgd import DPSGD, clip_per_example, noise_generator, noised_mean, per_example_grads
from edgelam.tasks.causal_lm import CausalLM


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model runs fastest on one thread (and is not slowed by other processes' threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def setup(tiny):
    """The tiny Llama with LoRA on q_proj / v_proj (B made non-zero, so A has gradients too) and
    16 examples of two lengths (so a batch pads)."""
    model = attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    data = build_federated_data(DataConfig(tasks=("reverse",), examples_per_task=20, num_clients=1, max_length=96),
                                tiny.tokenizer, seed=0).clients[0].train
    pad = int(tiny.tokenizer.pad_token_id)
    return model, data, CausalLM(pad), pad


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _clean(model: nn.Module) -> bool:
    """No hook and no Opacus attribute left on ``model``."""
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    marks = any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())
    return hooks == 0 and not marks and not hasattr(model, "autograd_grad_sample_hooks")


def _one_at_a_time(model: nn.Module, task, samples, params) -> list[list[torch.Tensor]]:
    out = []
    for s in samples:
        model.zero_grad(set_to_none=True)
        task.loss(model, task.collate([s])).backward()
        out.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def _assert_per_example(got: list[torch.Tensor], ref: list[list[torch.Tensor]]) -> None:
    for i, one in enumerate(ref):
        for g, r in zip(got, one):
            torch.testing.assert_close(g[i], r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


def test_per_example_gradients_of_the_peft_causal_lm_are_each_examples_own(setup):
    model, data, task, _ = setup
    by_length = sorted(data, key=lambda s: len(s.input_ids))
    samples = [by_length[0], by_length[-1], by_length[1], by_length[-2]]
    assert len({len(s.input_ids) for s in samples}) > 1  # the batch pads
    params = _trainable(model)
    ref = _one_at_a_time(model, task, samples, params)
    model.train()
    with per_example_grads(model, task, params) as per_example:
        grads, losses = per_example(task.collate(samples))
    assert all(g.shape == (4, *p.shape) for g, p in zip(grads, params))
    _assert_per_example(grads, ref)
    torch.testing.assert_close(losses, torch.stack([task.loss(model, task.collate([s])) for s in samples]).detach(),
                               rtol=1e-5, atol=0)
    assert _clean(model)  # the model serves the next client and evaluation unhooked


class _Toy(nn.Module):
    """Has its own parameter and a buffer beside a Linear: Opacus has no per-example rule for it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]))
        self.shift = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x * self.scale + self.shift))  # type: ignore[operator]


class _ToyTask:
    name: ClassVar[str] = "toy"

    def collate(self, samples):
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.tensor([s[1] for s in samples])}

    def output(self, model, batch):
        return model(batch["x"])

    def head_loss(self, output, batch):
        return nn.functional.cross_entropy(output, batch["y"])

    def loss(self, model, batch):
        return self.head_loss(self.output(model, batch), batch)


def test_a_model_opacus_refuses_gets_exact_per_example_gradients_from_torch_func():
    torch.manual_seed(0)
    model, task = _Toy().train(), _ToyTask()
    samples = [(torch.randn(3), k % 2) for k in range(5)]
    params = _trainable(model)
    ref = _one_at_a_time(model, task, samples, params)
    with per_example_grads(model, task, params) as per_example:
        grads, _ = per_example(task.collate(samples))
    _assert_per_example(grads, ref)
    assert _clean(model)  # Opacus' half-built hooks are gone too


def test_clipping_bounds_each_example_by_c_and_keeps_smaller_ones():
    # two parameters; example 0's whole gradient is (3, 4 | 0) (norm 5), example 1's (0.3, 0 | 0.4) (0.5)
    a = torch.tensor([[3.0, 4.0], [0.3, 0.0]])  # (B, 2)
    b = torch.tensor([[0.0], [0.4]])  # (B, 1)
    ca, cb = clip_per_example([a, b], clipping_norm=1.0)
    torch.testing.assert_close(ca[0], torch.tensor([0.6, 0.8]))  # 5 -> 1, direction kept
    assert torch.equal(ca[1], a[1]) and torch.equal(cb[1], b[1])  # under C: unchanged
    big = torch.randn(64, 5, 7, generator=torch.Generator().manual_seed(0)) * 10
    clipped = clip_per_example([big, big[:, :1]], clipping_norm=0.5)
    norms = (clipped[0].flatten(1).pow(2).sum(1) + clipped[1].flatten(1).pow(2).sum(1)).sqrt()
    assert bool((norms <= 0.5 * (1 + 1e-6)).all())


def _sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    """local_train's AdamW replaced by plain SGD, so a step is p - lr g and g can be checked."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))


def test_a_noise_free_unclipped_step_is_sgd_on_the_poisson_batch(setup, monkeypatch):
    model, data, task, pad = setup
    _sgd(monkeypatch)
    n, seed, lr = len(data), 3, 0.1
    cfg = TrainConfig(local_steps=1, batch_size=4, lr=lr, max_grad_norm=None)
    start = get_adapter_state(model)
    upd = local_train(model, start, data, cfg, 0.0, seed, pad, flop_model(model), dpsgd=DPSGD(0.0, 1e6))
    # by hand: each example in with probability q = 4 / n, from the trip's seed; loss sum / (q n)
    q = 4 / n
    drawn = [data[j] for j in torch.nonzero(torch.rand(n, generator=torch.Generator().manual_seed(seed)) < q).flatten()]
    assert drawn  # this seed draws a batch
    params = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
    set_adapter_state(model, start)
    model.zero_grad(set_to_none=True)
    (sum(task.loss(model, task.collate([s])) for s in drawn) / (q * n)).backward()
    expected = {k: (p - lr * p.grad).detach() for k, p in params.items()}
    got = {k.replace(".weight", ".default.weight"): v for k, v in upd.state.items()}
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)
    assert upd.dp_steps == ((q, 0.0, 1),)


def test_an_empty_draw_is_a_step_of_noise_only_of_std_sigma_c_over_qn(setup, monkeypatch):
    model, data, task, pad = setup
    _sgd(monkeypatch)
    lr, dp = 0.5, DPSGD(noise_multiplier=2.0, clipping_norm=0.3)
    cfg = TrainConfig(local_steps=1, batch_size=1, lr=lr, max_grad_norm=None)  # q = 1 / n
    seed = next(s for s in range(100) if not next(trip_steps(data, cfg, s, dp)))  # a seed that draws nothing
    start = get_adapter_state(model)
    upd = local_train(model, start, data, cfg, 0.0, seed, pad, flop_model(model), dpsgd=dp)
    assert upd.flops == 0 and upd.tokens == 0 and math.isnan(upd.train_loss)
    noise = noise_generator(seed)  # the trip's noise, parameter by parameter: N(0, (sigma C)^2) / (q n), q n = 1
    for k, p in ((k, p) for k, p in model.named_parameters() if p.requires_grad):
        key = k.replace(".default.weight", ".weight")
        z = torch.randn(p.shape, generator=noise) * (2.0 * 0.3) / 1
        torch.testing.assert_close(upd.state[key], start[key] - lr * z, rtol=1e-6, atol=1e-7)


def test_the_noise_per_coordinate_has_std_sigma_c_over_qn():
    dp, qn = DPSGD(noise_multiplier=1.5, clipping_norm=0.8), 6.0
    (z,) = noised_mean([torch.zeros(400, 500)], dp, qn, torch.Generator().manual_seed(0))
    want = 1.5 * 0.8 / qn
    assert abs(float(z.std()) / want - 1) < 0.02  # 200k coordinates: the estimate's own error is ~0.2%
    assert abs(float(z.mean())) < 5 * want / math.sqrt(z.numel())
    (z2,) = noised_mean([torch.zeros(400, 500)], dp, qn, torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)


def test_same_seed_same_update_bit_for_bit_and_the_trip_reports_its_steps(setup):
    model, data, task, pad = setup
    cfg, dp, fm = TrainConfig(local_steps=2, batch_size=4, lr=1e-2, grad_accum=2), DPSGD(1.1, 0.5), flop_model(model)
    start = get_adapter_state(model)
    u1, u2, other = (local_train(model, start, data, cfg, 0.0, s, pad, fm, dpsgd=dp) for s in (7, 7, 8))
    assert all(torch.equal(u1.state[k], u2.state[k]) for k in start)
    assert not all(torch.equal(u1.state[k], other.state[k]) for k in start)
    assert u1.dp_steps == ((min(1.0, 8 / len(data)), 1.1, 2),)  # q = batch_size * grad_accum / n
    assert local_train(model, start, data, cfg, 0.0, 7, pad, fm).dp_steps == ()
    # the FLOP plan replays the same Poisson batches (pieces of at most batch_size) from the seed
    assert planned_train_flops(data, cfg, 7, fm, task, dp) == u1.flops > 0
    assert all(len(piece) <= 4 for step in trip_steps(data, cfg, 7, dp) for piece in step)
    assert _clean(model)


def test_fedprox_and_max_grad_norm_act_on_the_noised_gradient(setup, monkeypatch):
    model, data, task, pad = setup
    _sgd(monkeypatch)
    start, fm, dp = get_adapter_state(model), flop_model(model), DPSGD(1.0, 1.0)
    lr, cap = 0.1, 1e-3
    capped = local_train(model, start, data, TrainConfig(local_steps=1, batch_size=4, lr=lr, max_grad_norm=cap), 0.0, 1,
                         pad, fm, dpsgd=dp)
    moved = sum(float(((capped.state[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    assert moved <= lr * cap * (1 + 1e-5)
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=lr, max_grad_norm=None)
    free, prox = (local_train(model, start, data, cfg, mu, 1, pad, fm, dpsgd=dp) for mu in (0.0, 5.0))
    dist = [sum(float(((u.state[k] - start[k]) ** 2).sum()) for k in start) for u in (free, prox)]
    assert dist[1] < dist[0]  # the proximal term pulls towards the global adapter


def test_the_executor_trains_and_plans_a_dpsgd_work(repo):
    drv = FLDriver(load_config(repo / "configs" / "tiny.yaml"))
    try:
        ctx, st = drv.ctx, drv.initial_state()
        work = dataclasses.replace(make_work(ctx, st.state, 1, 0, 11), dpsgd=DPSGD(1.0, 0.5))
        res = ctx.executor.run([work])[0]
        plan = plan_trip(ctx, work, uplink(ctx, st.state, 0, 1, work.start, work.start))
        n = len(ctx.data.clients[0].train)
        assert res.update.dp_steps == ((min(1.0, 4 / n), 1.0, 3),) and plan.flops == res.update.flops > 0
        assert _clean(ctx.model)
    finally:
        drv.close()


def test_settings_are_checked_and_the_work_carries_them_last():
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGD(-1.0, 1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        DPSGD(1.0, 0.0)
    assert [f.name for f in dataclasses.fields(ClientWork)][-1] == "dpsgd"
    assert dataclasses.fields(ClientWork)[-1].default is None
