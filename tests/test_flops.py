"""The analytic FLOP count agrees with PyTorch's own count of a real LoRA training step.

Eager attention, because PyTorch's FLOP counter does not see inside the CPU SDPA kernel."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgelam.config import LoraConfig as LoraSettings
from edgelam.models.flops import flop_model, forward_flops, lora_train_flops
from edgelam.models.load import tiny_model
from edgelam.models.lora import attach_lora


@pytest.mark.parametrize("seq_len", [32, 128])
def test_train_flops_match_flop_counter(tiny, seq_len):
    model = attach_lora(tiny_model(len(tiny.tokenizer), attn_implementation="eager"), LoraSettings(r=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")))
    model.train()
    ids = torch.randint(0, 200, (2, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops()
    predicted = lora_train_flops(flop_model(model), 2 * seq_len, seq_len)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_forward_flops_match_flop_counter(tiny):
    model = tiny_model(len(tiny.tokenizer), attn_implementation="eager")
    ids = torch.randint(0, 200, (1, 64))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids)
    assert forward_flops(flop_model(model), 64, 64) == pytest.approx(counter.get_total_flops(), rel=0.10)
