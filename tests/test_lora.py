"""Adapters: state round trip, bytes on the wire, PEFT format loads with PeftModel.from_pretrained."""

import torch
from peft import PeftModel

from edgelam.config import LoraConfig as LoraSettings
from edgelam.models.load import tiny_model
from edgelam.models.lora import attach_lora, deserialize, get_adapter_state, num_params, save_adapter, serialize, set_adapter_state


def test_state_roundtrip_and_bytes(tiny):
    model = attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(r=4, target_modules=("q_proj", "v_proj")))
    state = get_adapter_state(model)
    # 2 layers x (q: 4*(64+64), v: 4*(64+32)) = 2 * (512 + 384) = 1792 parameters
    assert num_params(state) == 1792
    blob = serialize(state)
    assert len(blob) > 1792 * 4  # fp32 plus the safetensors header
    back = deserialize(blob)
    assert all(torch.equal(back[k], state[k]) for k in state)
    changed = {k: v + 1 for k, v in state.items()}
    set_adapter_state(model, changed)
    assert all(torch.equal(get_adapter_state(model)[k], changed[k]) for k in state)


def test_saved_adapter_loads_with_peft(tiny, tmp_path):
    vocab = len(tiny.tokenizer)
    model = attach_lora(tiny_model(vocab, seed=1), LoraSettings(r=4))
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    save_adapter(model, state, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(vocab, seed=1), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)
    # a random B makes the adapter matter: the bare base gives other logits
    with torch.no_grad():
        assert not torch.allclose(tiny_model(vocab, seed=1)(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_set_rejects_foreign_state(tiny):
    import pytest

    model = attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(r=4))
    with pytest.raises(ValueError, match="does not match the model"):
        set_adapter_state(model, {"nope": torch.zeros(1)})


def test_bad_target_modules_list_the_real_ones(tiny):
    import pytest

    with pytest.raises(ValueError, match="its linear layers are"):
        attach_lora(tiny_model(len(tiny.tokenizer)), LoraSettings(target_modules=("c_attn",)))
