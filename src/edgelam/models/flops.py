"""FLOPs of LoRA (or full-parameter) fine-tuning and inference, counted from the model's own layers
and the tokens.

Per token and per matmul of a frozen weight W (d_in x d_out): forward 2*d_in*d_out; backward
needs only the activation gradient, another 2*d_in*d_out (no weight gradient: W is frozen).
LoRA's A (r x d_in) and B (d_out x r): forward 2r(d_in+d_out), backward 4r(d_in+d_out) (weight and
activation gradients). A weight trained in full (PEFT's ``modules_to_save`` copy: a head, or whole
decoder blocks with ``model.train: full``): forward 2*d_in*d_out, backward 4*d_in*d_out (activation
and weight gradients); the frozen original PEFT keeps beside the copy never runs and is not counted.
Frozen layers that come before every trained tensor (blocks ahead of the first fully trained
block) need no backward at all: nothing upstream of them wants a gradient.
Attention scores and the weighted sum: 4*T*d_attn per token per layer forward (T = the padded
sequence length the kernel computes), twice that backward (in the layers that have a backward).
Source: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 (C_forward ~ 2N +
2 n_layer n_ctx d_attn; the backward is twice the forward, the weight-gradient half of it only for
trained weights); the LoRA split follows Hu et al. 2021 (frozen W: no weight gradients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopModel:
    frozen_linear_macs: int  # sum of d_in*d_out over frozen nn.Linear layers (LM head included)
    lora_macs: int  # sum of r*(d_in+d_out) over LoRA-adapted layers
    n_layers: int
    d_attn: int  # num_heads * head_dim
    full_macs: int = 0  # sum of d_in*d_out over nn.Linear layers trained in full (modules_to_save copies)
    no_grad_macs: int = 0  # the part of frozen_linear_macs ahead of every trained tensor: forward only
    no_grad_layers: int = 0  # attention layers ahead of every trained tensor: forward only


def flop_model(model: nn.Module) -> FlopModel:
    """Read the matmul sizes off the (PEFT-wrapped or bare) model."""
    cfg = getattr(model, "config")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return module_flop_model(model, int(cfg.num_hidden_layers), int(cfg.num_attention_heads * head_dim))


def module_flop_model(model: nn.Module, n_layers: int, d_attn: int) -> FlopModel:
    """The matmul sizes of any module (a segment of a split model) with ``n_layers`` attention layers.
    Modules are visited in registration order, which is the forward order of the decoders and
    encoders used here (embeddings, blocks 0..L-1, final norm, head)."""
    frozen, lora, full, no_grad = 0, 0, 0, 0
    trained_seen = False  # a trained (or LoRA-adapted) module came before: backward from here on
    no_grad_blocks: set[str] = set()
    for name, mod in model.named_modules():
        if ".original_module." in name or name.endswith(".original_module"):  # PEFT runs the trained copy
            continue
        trained_seen = trained_seen or _trained(name, mod)
        if not isinstance(mod, nn.Linear):
            continue
        macs = mod.in_features * mod.out_features
        if ".lora_A." in name or ".lora_B." in name:
            lora += macs  # A: r*d_in, B: d_out*r
        elif ".modules_to_save." in name:
            full += macs
        else:
            frozen += macs
        if not trained_seen:
            no_grad += macs
            block = _BLOCK.match(name)
            if block:
                no_grad_blocks.add(block.group(1))
    if not trained_seen:  # nothing trains (an inference model): no backward to shorten
        no_grad, no_grad_blocks = 0, set()
    return FlopModel(frozen, lora, n_layers, d_attn, full, no_grad, len(no_grad_blocks))


def _trained(name: str, mod: nn.Module) -> bool:
    """A module with trainable tensors, a LoRA layer (its base layer computes LoRA's input
    gradient path) or a trained copy."""
    return (".modules_to_save." in name or ".lora_" in name or name.endswith(".base_layer")
            or any(p.requires_grad for p in mod.parameters(recurse=False)))


# a module inside decoder / encoder block i: "model.layers.3.mlp.up_proj", "encoder.layer.3.output.dense"
_BLOCK = re.compile(r"^(.*\.layers?\.\d+)\.")


def forward_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """Forward FLOPs of ``n_tokens`` tokens in sequences of (padded) length ``seq_len``."""
    return float(_forward_per_token(fm, seq_len)) * n_tokens


def lora_train_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one training pass (LoRA factors and any weights trained in full)
    over ``n_tokens`` (padded) tokens."""
    return float(_forward_per_token(fm, seq_len) + _backward_per_token(fm, seq_len)) * n_tokens


def backward_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """The backward half of ``lora_train_flops``: activation gradients down to the first trained
    layer, weight gradients of the LoRA factors and of the weights trained in full."""
    return float(_backward_per_token(fm, seq_len)) * n_tokens


def _forward_per_token(fm: FlopModel, seq_len: int) -> int:
    return 2 * (fm.frozen_linear_macs + fm.full_macs) + 2 * fm.lora_macs + 4 * fm.n_layers * seq_len * fm.d_attn


def _backward_per_token(fm: FlopModel, seq_len: int) -> int:
    frozen = fm.frozen_linear_macs - fm.no_grad_macs  # activation gradients only
    attn = 8 * (fm.n_layers - fm.no_grad_layers) * seq_len * fm.d_attn
    return 2 * frozen + 4 * fm.lora_macs + 4 * fm.full_macs + attn
