"""Tensors on the wire between inference services: safetensors bytes, never JSON floats.

A message is one safetensors blob: named tensors plus string metadata (session id, position,
adapter, ...). ``dtype="float16"`` halves floating-point tensors on the wire; integer tensors
(token ids) travel as they are.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

CONTENT_TYPE = "application/x-safetensors"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class WireError(ValueError):
    """A message that is not a valid safetensors blob with EdgeLAM metadata."""


def pack(tensors: dict[str, Tensor], meta: dict[str, Any] | None = None, dtype: str = "float32") -> bytes:
    wire = WIRE_DTYPES[dtype]
    out = {k: (v.to(wire) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return save(out, metadata={"edgelam": json.dumps(meta or {})})


def unpack(data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors (floating point ones as float32) and metadata of a message; a clear error if malformed."""
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("edgelam", "{}"))
    except Exception as exc:  # safetensors raises several types for a bad blob
        raise WireError(f"body is not a valid safetensors message ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise WireError("message metadata 'edgelam' must be a JSON object")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, meta
