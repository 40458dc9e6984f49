"""Full-parameter training of chosen decoder blocks through PEFT (``model.train: full``).

PEFT's ``modules_to_save`` trains whole modules and keeps their weights in the adapter; a
LoraConfig whose ``target_modules`` is PEFT's dummy value (``DUMMY_TARGET_MODULES``, "match
nothing, and allow it", what X-LoRA uses) adds no LoRA layer at all. So the chosen blocks' own
weights *are* the adapter state: ``models/lora.get_adapter_state`` / ``set_adapter_state``,
``serialize`` (the bytes on the links), checkpoints and ``save_pretrained`` work unchanged, and a
saved folder loads back with ``PeftModel.from_pretrained``.

PEFT trains a copy of each chosen module (``ModulesToSaveWrapper``: the original stays frozen
beside it), so the trained blocks are held twice in memory. The token embedding is never trained
here: it is tied to the LM head in SmolLM2 and the tiny model, and a copy of one would untie them.

Split learning (``attach_split_full``) mixes the two: the chosen blocks (by default the server's)
in full, LoRA on every other block, one PEFT adapter holding both.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from edgelam.config import ConfigError
from edgelam.config import LoraConfig as LoraSettings

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")  # Llama / Mistral / Qwen, GPT-2, OPT


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    n = int(getattr(model, "config").num_hidden_layers)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ConfigError(f"model.train full: found no list of {n} decoder blocks in {type(model).__name__}")


def full_module_names(model: nn.Module, blocks: tuple[int, ...] | None) -> list[str]:
    """The modules trained in full: blocks ``blocks`` (None: every block and the final norm)."""
    where, layers = decoder_blocks(model)
    if blocks is None:
        parent = model.get_submodule(where.rsplit(".", 1)[0]) if "." in where else model
        norm = next((n for n in FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
        prefix = f"{where.rsplit('.', 1)[0]}." if "." in where else ""
        return [f"{where}.{i}" for i in range(len(layers))] + ([prefix + norm] if norm else [])
    bad = [i for i in blocks if i >= len(layers)]
    if bad:
        raise ConfigError(f"model.full_blocks {list(blocks)} names blocks {bad} the model does not have; it has "
                          f"{len(layers)} (indices 0..{len(layers) - 1})")
    return [f"{where}.{i}" for i in sorted(blocks)]


def attach_full(model: nn.Module, blocks: tuple[int, ...] | None, task_type: str | None = "CAUSAL_LM") -> PeftModel:
    """Wrap ``model`` so that exactly the chosen blocks (and, for ``blocks`` None, the final norm)
    train, in full; the adapter state is their weights, named as in the base model."""
    names = full_module_names(model, blocks)
    # PEFT matches modules_to_save by suffix; a full dotted name ("model.layers.1") cannot match
    # "model.layers.11" or a module elsewhere
    cfg = LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=names, task_type=task_type)
    return get_peft_model(model, cfg)


def split_full_blocks(cut: tuple[int, int], blocks: tuple[int, ...] | None) -> tuple[int, ...]:
    """The blocks split learning trains in full: ``blocks`` (model.full_blocks), or (None) every block
    the server runs, [a, b) of ``cut``."""
    a, b = cut
    chosen = tuple(range(a, b)) if blocks is None else tuple(sorted(blocks))
    if not chosen:
        raise ConfigError(f"model.full_blocks null trains the server's blocks in full, and split.cut {[a, b]} puts "
                          "none on the server; list the blocks to train in model.full_blocks, or use model.train lora")
    return chosen


def attach_split_full(model: nn.Module, blocks: tuple[int, ...], lora: LoraSettings, seed: int,
                      task_type: str | None = "CAUSAL_LM") -> PeftModel:
    """Wrap ``model``: decoder blocks ``blocks`` train in full (``modules_to_save``), LoRA (``lora``,
    A matrices seeded by ``seed``) on its target modules everywhere else. PEFT never puts an adapter
    inside a ``modules_to_save`` module, so a full block has no LoRA layer; the adapter state holds both."""
    names = full_module_names(model, blocks)
    _, layers = decoder_blocks(model)
    inside = tuple(f"{n}." for n in names)
    outside = [n for n, _ in model.named_modules() if not n.startswith(inside)]
    targets: str | list[str] = list(lora.target_modules)
    if not any(n == t or n.endswith("." + t) for n in outside for t in targets):
        if len(blocks) < len(layers):
            raise ConfigError(f"model.lora.target_modules {targets} match no module outside the blocks trained in full "
                              f"{list(blocks)}; name the other blocks' linear layers (q_proj, v_proj, ...)")
        targets = DUMMY_TARGET_MODULES  # every block in full and no embedding LoRA: no LoRA layer at all
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     modules_to_save=names, task_type=task_type)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)
