"""int8 devices: a module host's blocks and LM head with int8 weights (dynamic quantisation on CPU).

``torch.ao.quantization.quantize_dynamic`` stores each ``nn.Linear`` weight as int8 (one scale per
tensor) and quantises the activations on the fly, per call, so no calibration data is needed;
the matrix products run in int8 (FBGEMM / oneDNN on x86). LoRA layers are quantised as the
``nn.Linear`` modules they are made of, so a trained draft keeps its adapter. The embedding and the
norms stay in float32. The quantised modules are copies: the float model, which other hosts in the
same process may share (``models.load`` caches bases), is left as it was.

PyTorch marks its quantised-tensor API deprecated in favour of ``torchao``, whose CPU int8 path is
not yet a drop-in for dynamic quantisation of arbitrary ``nn.Linear`` modules; the warning is
silenced here and this module is the one place to switch.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

QUANTIZE = ("int8",)


def weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the modules' weights as stored (int8 packed weights included)."""
    total = 0
    for m in modules:
        for mod in m.modules():
            if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear):
                w, b = mod._weight_bias()
                total += w.int_repr().numel() + (b.numel() * b.element_size() if b is not None else 0)
        total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def int8(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.Linear`` (or the module itself, if it is one) in int8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantised tensors (module docstring)
        holder = nn.ModuleDict({"m": copy.deepcopy(module)})
        return torch.ao.quantization.quantize_dynamic(holder, {nn.Linear}, dtype=torch.qint8)["m"]


def quantize(host: Any, mode: str) -> dict[str, int]:
    """Quantise ``host``'s blocks and LM head (``mode``: int8); returns their weight bytes before and after."""
    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got '{mode}'")
    if not host.task.generates:
        raise ValueError(f"quantize: only decoder modules (blocks, head, full) are quantised, not a {host.task.name}")
    parts = [*host.layers, *([host.lm_head] if host.spec.kind in ("head", "full") else [])]
    before = weight_bytes(parts)
    host.layers = [int8(layer) for layer in host.layers]
    if host.spec.kind in ("head", "full"):
        host.lm_head = int8(host.lm_head)
    after = weight_bytes([*host.layers, *([host.lm_head] if host.spec.kind in ("head", "full") else [])])
    host.quantized = {"mode": mode, "weight_bytes_before": before, "weight_bytes_after": after}
    return host.quantized
