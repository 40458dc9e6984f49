"""What crosses the air in split learning: a tensor encoded as float32, float16 or int8.

int8 is symmetric absmax quantization per row of the last dimension (one float32 scale per token
vector). The byte count is read off the encoded tensors themselves, so it is exact; the receiver
works on the decoded tensor, and the codec's error reaches the loss exactly as it would on a link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CODECS = ("float32", "float16", "int8")


@dataclass(frozen=True)
class Wire:
    decoded: Tensor  # what the receiver computes with (float32)
    nbytes: int  # bytes on the link: the encoded tensors' storage


def encode(x: Tensor, codec: str) -> Wire:
    """Encode ``x`` for the link and decode it at the receiver."""
    x = x.detach()
    if codec == "float32":
        enc = x.float()
        return Wire(enc, enc.numel() * enc.element_size())
    if codec == "float16":
        enc = x.half()
        return Wire(enc.float(), enc.numel() * enc.element_size())
    if codec == "int8":
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp_min(1e-12)
        q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
        return Wire(q.float() * scale, q.numel() * q.element_size() + scale.numel() * scale.element_size())
    raise ValueError(f"unknown codec '{codec}'; choose one of {CODECS}")


def wire_bytes(shape: tuple[int, ...], codec: str) -> int:
    """Bytes ``encode`` produces for a tensor of ``shape`` (known before the tensor exists)."""
    n = math.prod(shape)
    if codec == "float32":
        return 4 * n
    if codec == "float16":
        return 2 * n
    if codec == "int8":
        return n + 4 * (n // shape[-1])
    raise ValueError(f"unknown codec '{codec}'; choose one of {CODECS}")


def mask_bytes(shape: tuple[int, ...]) -> int:
    """The attention (padding) mask travels with the activations as one byte per token."""
    return math.prod(shape)
