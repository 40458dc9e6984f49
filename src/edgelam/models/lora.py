"""LoRA through PEFT: attach adapters, read/write adapter state as plain dicts, save in PEFT format.

The federated payload is the adapter state dict (PEFT's names, no adapter name inside), so a
saved adapter loads with ``PeftModel.from_pretrained(base, path)``.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from edgelam.config import LoraConfig as LoraSettings

AdapterState = dict[str, Tensor]


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int = 0, task_type: str | None = "CAUSAL_LM",
                modules_to_save: tuple[str, ...] = ()) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter; the initial A matrices depend only on ``seed``.
    ``task_type`` None wraps a bare backbone (an encoder for split learning, a task's own model).
    ``modules_to_save`` names modules trained in full (a classification head): PEFT keeps a
    trainable copy of each, and their weights join the adapter state, its bytes and saved files."""
    cfg = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), task_type=task_type,
        modules_to_save=list(modules_to_save) or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, cfg)
        except ValueError as exc:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"model.lora.target_modules {list(settings.target_modules)} do not match this model ({exc}); "
                f"its linear layers are: {names}"
            ) from None
    return peft_model


def get_adapter_state(model: PeftModel) -> AdapterState:
    """A detached copy of the adapter's tensors, keyed as in PEFT's saved files."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Load ``state`` into the model's active adapter; a missing or unexpected key is an error."""
    expected = set(get_peft_model_state_dict(model))
    got = set(state)
    if expected != got:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise ValueError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"PEFT rejected adapter keys {unexpected[:3]}")


def num_params(state: AdapterState) -> int:
    return sum(t.numel() for t in state.values())


def serialize(state: AdapterState) -> bytes:
    """The bytes that cross a link: the adapter state as safetensors."""
    return st_save({k: v.contiguous() for k, v in state.items()})


def deserialize(data: bytes) -> AdapterState:
    return dict(st_load(data))


def save_adapter(model: PeftModel, state: AdapterState, path: str | os.PathLike[str]) -> None:
    """Save ``state`` in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    set_adapter_state(model, state)
    model.save_pretrained(str(path))


def load_adapters(model: nn.Module, adapters: dict[str, os.PathLike[str] | str]) -> PeftModel:
    """``model`` with each PEFT adapter folder loaded under its name, in eval mode; the first
    (by name) is active. A folder PEFT cannot read is a ``ValueError`` naming it."""
    names = sorted(adapters)
    peft: PeftModel | None = None
    for n in names:
        try:
            if peft is None:
                peft = PeftModel.from_pretrained(model, str(adapters[n]), adapter_name=n)
            else:
                peft.load_adapter(str(adapters[n]), adapter_name=n)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"adapter '{n}' ({adapters[n]}) does not load on this model: {exc}") from None
    if peft is None:
        raise ValueError("no adapter folders given")
    peft.set_adapter(names[0])
    peft.eval()
    return peft
