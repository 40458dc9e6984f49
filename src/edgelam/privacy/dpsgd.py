"""Sample-level DP-SGD (Abadi et al., CCS 2016, Algorithm 1) on a client's trainable parameters
(the LoRA factors and a task's head), as pure functions plus the per-example gradient machinery.

One step of a client with n examples: draw a batch by Poisson sampling (each example independently
with rate q; Mironov, Talwar, Zhang 2019, the sampled Gaussian mechanism the accountant composes),
take each example's gradient g_i of its own loss, clip it to ``g_i / max(1, ||g_i|| / C)`` (Abadi
eq. "clip gradient", the norm over all trainable parameters together), sum, add N(0, sigma^2 C^2 I)
and divide by the expected batch size q n (a fixed denominator: one example changes the sum by at
most C whatever the batch drawn). ``fl/client.local_train`` runs these steps.

Per-example gradients, one path per model (``per_example_grads``):
- Opacus' ``GradSampleModule`` hooks (Yousefpour et al. 2021) wherever Opacus takes the model: one
  batched forward and backward, per-example weight gradients from the captured activations and
  output gradients. It composes with every PEFT-wrapped Hugging Face backbone here (causal LM,
  classification, channel and sensing tasks), where ``torch.func.vmap`` does not: transformers'
  attention-mask building branches on tensor values (``mask.all()``), which vmap refuses.
- ``torch.func`` (``functional_call`` + ``vmap(grad(...))``) where Opacus refuses the model: Opacus
  has no rule for a module holding both its own parameter and a buffer (the beam task's
  ``FeatureEmbed``), and such models pass no attention mask, so vmap runs them.
The hooks live only inside the ``per_example_grads`` block: the base model is shared by every client
and by evaluation, so nothing of Opacus (hooks, ``grad_sample`` attributes) outlives a trip.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from edgelam.store import torch_seed_for
from edgelam.tasks.base import Batch, Task

PerExample = Callable[[Batch], tuple[list[Tensor], Tensor]]  # batch -> (per-parameter (B, *shape) grads, (B,) losses)
NOISE_KEY = 0xD95  # the noise stream's key after the trip's seed (independent of the batch draws)


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD's settings for one trip: noise multiplier sigma and per-example clipping norm C."""

    noise_multiplier: float  # sigma (0: clipping only, no privacy; for tests)
    clipping_norm: float  # C

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"DPSGD.noise_multiplier (sigma) must be a finite number >= 0, "
                             f"got {self.noise_multiplier}")
        if not (self.clipping_norm > 0):
            raise ValueError(f"DPSGD.clipping_norm (C) must be > 0, got {self.clipping_norm}")


# --- the maths ---


def sample_rate(expected_batch: int, n: int) -> float:
    """Poisson sampling rate q = expected batch / n, at most 1 (every example, every step)."""
    if n < 1:
        raise ValueError(f"DP-SGD needs at least one example, got n = {n}")
    return min(1.0, expected_batch / n)


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the examples drawn: each of 0..n-1 independently with probability ``rate``
    (possibly none: the step is then noise only)."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def clip_per_example(grads: Sequence[Tensor], clipping_norm: float) -> list[Tensor]:
    """Each example's gradient, over all parameters at once, scaled to L2 norm at most C:
    g_i * min(1, C / ||g_i||) (Abadi et al. 2016, Alg. 1). ``grads``: one (B, *shape) per parameter."""
    if not grads:
        return []
    norms = torch.stack([g.flatten(1).float().pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()  # (B,)
    factor = (clipping_norm / norms.clamp_min(1e-30)).clamp(max=1.0)  # (B,)
    return [g * factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads]


def noised_mean(clipped_sum: Sequence[Tensor], dp: DPSGD, expected_batch: float,
                generator: torch.Generator) -> list[Tensor]:
    """(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q n) per parameter: the noise is drawn on the CPU
    from ``generator`` (the same numbers on any device), then moved to each parameter's device."""
    std = dp.noise_multiplier * dp.clipping_norm
    out = []
    for s in clipped_sum:
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float32) * std
        out.append((s + noise.to(s.device, s.dtype)) / expected_batch)
    return out


def noise_generator(seed: int) -> torch.Generator:
    """The trip's noise stream: seeded from the trip's seed, independent of its batch draws."""
    return torch.Generator().manual_seed(torch_seed_for(seed, NOISE_KEY))


def example_losses(task: Task, output: Tensor, batch: Batch) -> Tensor:
    """(B,) each example's own training loss (the task's ``head_loss`` on its row alone)."""
    b = output.shape[0]
    bad = sorted(k for k, v in batch.items() if v.shape[0] != b)
    if bad:
        raise ValueError(f"DP-SGD needs every batch tensor to lead with the batch dimension {b}; {bad} do not")
    return torch.stack([task.head_loss(output[i:i + 1], {k: v[i:i + 1] for k, v in batch.items()}) for i in range(b)])


# --- per-example gradients ---


@contextlib.contextmanager
def per_example_grads(model: nn.Module, task: Task, params: Sequence[Tensor]) -> Iterator[PerExample]:
    """Within the block, a function from a batch to each example's gradient of its own loss w.r.t.
    ``params`` (one (B, *shape) tensor per parameter) and the (B,) losses; Opacus' hooks where
    Opacus takes ``model``, else ``torch.func`` (see the module docstring). ``model`` must be in
    training mode (Opacus only records activations then). Every hook is gone after the block."""
    from opacus import GradSampleModule

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    except NotImplementedError:  # a module Opacus has no per-example rule for
        _remove_opacus(model)
        yield _func_grads(model, task, params)
        return
    try:
        yield _opacus_grads(model, task, params)
    finally:
        gsm._close()  # hooks and every grad_sample attribute
        _remove_opacus(model)


def _opacus_grads(model: nn.Module, task: Task, params: Sequence[Tensor]) -> PerExample:
    def grads(batch: Batch) -> tuple[list[Tensor], Tensor]:
        losses = example_losses(task, task.output(model, batch), batch)  # (B,)
        with warnings.catch_warnings():  # "full backward hook is firing ... no inputs require gradients": as meant
            warnings.simplefilter("ignore", UserWarning)
            losses.sum().backward()  # loss_reduction="sum": grad_sample[i] is d loss_i / d theta
        out = []
        for p in params:
            g = getattr(p, "grad_sample", None)
            out.append(torch.zeros(len(losses), *p.shape, dtype=p.dtype, device=p.device) if g is None else g.detach())
        for p in model.parameters():  # the next batch starts from nothing (Opacus would accumulate)
            if p.requires_grad:
                p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        return out, losses.detach()

    return grads


class _WithParams:
    """``model`` called with ``params`` in place of its own (``torch.func.functional_call``), so a
    task's ``output`` runs unchanged inside ``vmap``; other attributes are the model's."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _func_grads(model: nn.Module, task: Task, params: Sequence[Tensor]) -> PerExample:
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def one_loss(ps: dict[str, Tensor], row: Batch) -> tuple[Tensor, Tensor]:
        one = {k: v.unsqueeze(0) for k, v in row.items()}  # a batch of this one example
        loss = task.head_loss(task.output(_WithParams(model, ps), one), one)
        return loss, loss.detach()

    per_row = torch.func.vmap(torch.func.grad(one_loss, has_aux=True), in_dims=(None, 0), randomness="different")

    def grads(batch: Batch) -> tuple[list[Tensor], Tensor]:
        g, losses = per_row({k: p.detach() for k, p in zip(keys, params)}, batch)
        return [g[k] for k in keys], losses

    return grads


def _remove_opacus(model: nn.Module) -> None:
    """Whatever a half-built or closed ``GradSampleModule`` left on ``model``."""
    from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS

    for handle in getattr(model, "autograd_grad_sample_hooks", []):
        handle.remove()
    if hasattr(model, "autograd_grad_sample_hooks"):
        delattr(model, "autograd_grad_sample_hooks")
    for m in model.modules():
        for attr in ("ft_compute_sample_grad", "activations", "max_batch_len"):
            if attr in m.__dict__:
                delattr(m, attr)
    for p in model.parameters():
        for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
