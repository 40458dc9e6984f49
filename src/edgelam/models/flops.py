"""FLOPs of LoRA fine-tuning and inference, counted from the model's own layers and the tokens.

Per token and per matmul of a frozen weight W (d_in x d_out): forward 2*d_in*d_out; backward
needs only the activation gradient, another 2*d_in*d_out (no weight gradient: W is frozen).
LoRA's A (r x d_in) and B (d_out x r): forward 2r(d_in+d_out), backward 4r(d_in+d_out) (weight and
activation gradients). Attention scores and the weighted sum: 4*T*d_attn per token per layer
forward (T = the padded sequence length the kernel computes), twice that backward.
Source: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 (C_forward ~ 2N +
2 n_layer n_ctx d_attn); the LoRA split follows Hu et al. 2021 (frozen W: no weight gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopModel:
    frozen_linear_macs: int  # sum of d_in*d_out over frozen nn.Linear layers (LM head included)
    lora_macs: int  # sum of r*(d_in+d_out) over LoRA-adapted layers
    n_layers: int
    d_attn: int  # num_heads * head_dim


def flop_model(model: nn.Module) -> FlopModel:
    """Read the matmul sizes off the (PEFT-wrapped or bare) model."""
    cfg = getattr(model, "config")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return module_flop_model(model, int(cfg.num_hidden_layers), int(cfg.num_attention_heads * head_dim))


def module_flop_model(model: nn.Module, n_layers: int, d_attn: int) -> FlopModel:
    """The matmul sizes of any module (a segment of a split model) with ``n_layers`` attention layers."""
    frozen, lora = 0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if ".lora_A." in name or ".lora_B." in name:
            lora += mod.in_features * mod.out_features  # A: r*d_in, B: d_out*r
        else:
            frozen += mod.in_features * mod.out_features
    return FlopModel(frozen, lora, n_layers, d_attn)


def forward_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """Forward FLOPs of ``n_tokens`` tokens in sequences of (padded) length ``seq_len``."""
    per_token = 2 * fm.frozen_linear_macs + 2 * fm.lora_macs + 4 * fm.n_layers * seq_len * fm.d_attn
    return float(per_token) * n_tokens


def lora_train_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one LoRA training pass over ``n_tokens`` (padded) tokens."""
    fwd = 2 * fm.frozen_linear_macs + 2 * fm.lora_macs + 4 * fm.n_layers * seq_len * fm.d_attn
    bwd = 2 * fm.frozen_linear_macs + 4 * fm.lora_macs + 8 * fm.n_layers * seq_len * fm.d_attn
    return float(fwd + bwd) * n_tokens


def backward_flops(fm: FlopModel, n_tokens: int, seq_len: int) -> float:
    """The backward half of ``lora_train_flops``: activation gradients, LoRA weight gradients."""
    return float(2 * fm.frozen_linear_macs + 4 * fm.lora_macs + 8 * fm.n_layers * seq_len * fm.d_attn) * n_tokens
