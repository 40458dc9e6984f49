"""The Task seam: causal LM as before, classification with a head that travels in the adapter state."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from edgelam.config import TASK_NAMES, ConfigError, DataConfig, LoraConfig as LoraSettings, TrainConfig
from edgelam.config_load import load_config
from edgelam.data.build import build_federated_data
from edgelam.data.classification import synthetic_rows, tokenize
from edgelam.fl import hetero
from edgelam.fl.client import local_train
from edgelam.fl.evaluate import task_sums
from edgelam.models.flops import flop_model, lora_train_flops
from edgelam.models.load import byte_tokenizer, tiny_model
from edgelam.models.lora import get_adapter_state, save_adapter, serialize, set_adapter_state
from edgelam.models.split import load_encoder
from edgelam.tasks import TASKS
from edgelam.tasks.causal_lm import CausalLM
from edgelam.tasks.classification import HEAD, Classification, classifier_model

ENCODER_LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))


def fresh_encoder() -> torch.nn.Module:
    """tiny-encoder with seed 0's weights, not the process-wide cached copy (tests wrap it in LoRA)."""
    return load_encoder.__wrapped__("tiny-encoder", 0)[0]  # type: ignore[attr-defined]


@pytest.fixture
def classifier():
    tok = byte_tokenizer()
    task = Classification(int(tok.pad_token_id), num_classes=2)
    data = tokenize(synthetic_rows("synthetic_sentiment", 48, seed=0, stream=0), tok, 48, "synthetic_sentiment")
    return task, task.wrap(fresh_encoder(), ENCODER_LORA, seed=0), data


def test_task_names_in_config_match_the_registry() -> None:
    assert TASK_NAMES == tuple(TASKS)


def test_task_auto_follows_the_data_source(repo) -> None:
    assert load_config(repo / "configs/tiny.yaml").task == "causal_lm"
    assert load_config(repo / "configs/tiny_fl_classification.yaml").task == "classification"
    with pytest.raises(ConfigError, match="task must be one of"):
        load_config(repo / "configs/tiny.yaml", ["task=csi"])
    with pytest.raises(ConfigError, match="task does not fit data.source 'synthetic'"):
        load_config(repo / "configs/tiny.yaml", ["task=classification"])
    with pytest.raises(ConfigError, match="eval.generate"):
        load_config(repo / "configs/tiny_fl_classification.yaml", ["eval.generate=2"])


def test_causal_lm_task_is_the_models_own_loss(tiny) -> None:
    pad = int(tiny.tokenizer.pad_token_id)
    task = CausalLM(pad)
    model = task.wrap(tiny_model(len(tiny.tokenizer)), LoraSettings(r=4, dropout=0.0), seed=0)
    data = build_federated_data(DataConfig(tasks=("reverse",), examples_per_task=8, num_clients=1, max_length=48),
                                tiny.tokenizer, seed=0).clients[0].train
    batch = task.collate(data[:4])
    b, t = batch["input_ids"].shape
    with torch.no_grad():
        assert torch.equal(task.loss(model, batch), model(**batch).loss)
        sums = task.eval_sums(model, batch)
        # the summed token loss over its tokens is the model's mean loss
        assert sums["loss_sum"] / sums["count"] == pytest.approx(float(model(**batch).loss), rel=1e-5)
    assert task.tokens(batch) == b * t
    assert task.work_flops(flop_model(model), batch) == lora_train_flops(flop_model(model), b * t, t)
    model.unload()


def test_classification_trains_its_head_and_lowers_the_loss(classifier) -> None:
    task, model, data = classifier
    start = get_adapter_state(model)
    head = sorted(k for k in start if HEAD in k)
    assert head and all(not hetero.is_lora(k) for k in head)  # weight and bias of the linear layer
    # the head is in the adapter state, so in what is serialized (and counted in bytes)
    lora_only = {k: v for k, v in start.items() if k not in head}
    assert len(serialize(start)) > len(serialize(lora_only))
    before = task.metrics(task_sums(task, model, data, 16))["loss"]
    upd = local_train(model, start, data, TrainConfig(local_steps=12, batch_size=8, lr=1e-2), 0.0, seed=0,
                      pad_id=task.pad_id, fm=flop_model(model), task=task)
    after = task.metrics(task_sums(task, model, data, 16))["loss"]
    assert after < before
    assert all(not torch.equal(upd.state[k], start[k]) for k in head)  # the head trained
    assert upd.tokens > 0 and upd.flops > 0 and set(upd.state) == set(start)


def test_saved_classifier_reloads_with_peft_and_its_head(classifier, tmp_path) -> None:
    task, model, data = classifier
    upd = local_train(model, get_adapter_state(model), data, TrainConfig(local_steps=3, batch_size=8, lr=1e-2), 0.0,
                      seed=0, pad_id=task.pad_id, fm=flop_model(model), task=task)
    save_adapter(model, upd.state, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == [HEAD]
    batch = task.collate(data[:8])
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # a new head (another seed) on a fresh copy of the encoder: the saved folder brings LoRA and the head
    loaded = PeftModel.from_pretrained(classifier_model(fresh_encoder(), 2, seed=123), str(tmp_path / "adapter"))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(got, expected)


def test_head_survives_the_rank_helpers(classifier) -> None:
    # heterogeneous-rank LoRA (fl/hetero.py) passes the head through truncation and padding
    _, model, _ = classifier
    state = get_adapter_state(model)
    head = {k: v for k, v in state.items() if HEAD in k}
    small = hetero.truncate(state, 2)
    assert all(torch.equal(small[k], v) for k, v in head.items())
    assert hetero.rank_of(small) == 2
    set_adapter_state(model, hetero.pad(small, 4))  # same keys and shapes as the model's own
    set_adapter_state(model, hetero.mask_rank(state, 2))


@pytest.mark.parametrize("strategy,extra", [("fedavg", []), ("hetlora", ["fl.rank.ranks=[2,4]"])])
def test_federated_classification_run(tmp_path, split_source: str, strategy: str, extra: list[str]) -> None:
    from edgelam.lifecycle import run

    cfg = load_config("configs/tiny_fl_classification.yaml", [f"data.source={split_source}", f"fl.strategy={strategy}",
                                                               "fl.rounds=2", "eval.max_per_task=32", *extra])
    assert cfg.task == "classification"
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)
    assert rows[-1]["eval_tasks"][split_source]["accuracy"] == rows[-1]["eval_accuracy"]
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert all(r["bytes_up"] > 0 for r in rows[1:])
    saved = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    from safetensors.torch import load

    assert any(HEAD in k for k in load(saved))  # the trained head is saved with the adapter
