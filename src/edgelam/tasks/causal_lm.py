"""Causal-LM text: chat-formatted (or plain) text, loss on the answer tokens, perplexity.

A sample is ``data.format.Encoded`` (token ids and labels, IGNORE on the prompt); the model is a
decoder with its own LM head, so LoRA is the only trainable part. Numbers are token-weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.data.build import build_federated_data, resolve_auto
from edgelam.data.format import IGNORE, Encoded, collate
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import load_base
from edgelam.models.lora import attach_lora
from edgelam.models.split import is_encoder
from edgelam.tasks.base import Batch, TaskSetup


class CausalLM:
    name = "causal_lm"

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        if is_encoder(cfg.model.name):
            raise ConfigError(f"model.name '{cfg.model.name}' is an encoder; task causal_lm needs a causal LM "
                              f"(tiny, smollm2, a Hugging Face id); an encoder trains task classification")
        base = load_base(cfg.model.name, cfg.model.dtype, cfg.seed if cfg.model.name == "tiny" else 0)
        data = build_federated_data(resolve_auto(cfg.data)[0], base.tokenizer, cfg.seed)  # the Python API may pass auto
        return TaskSetup(cls(int(base.tokenizer.pad_token_id)), base.model, base.tokenizer, data)

    def collate(self, samples: Sequence[Encoded]) -> Batch:
        return collate(list(samples), self.pad_id)

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        return attach_lora(base, lora, seed=seed)

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        # Keep only the loss: holding the model output (logits, (B, T, V)) into the next
        # forward costs fresh allocations of ~100 MB per step on SmolLM2.
        loss: Tensor = model(**batch).loss
        return loss

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        """Summed next-token cross-entropy over the answer tokens and their number."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return self.head_sums(logits, batch)

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        """Mean next-token cross-entropy over the answer tokens (logits (B, T, V) predict token t+1)."""
        return F.cross_entropy(output[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        labels = batch["labels"][:, 1:]
        total = float(F.cross_entropy(output[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                      ignore_index=IGNORE, reduction="sum"))
        return {"loss_sum": total, "count": int((labels != IGNORE).sum())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / sums["count"] if sums.get("count") else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        b, t = batch["input_ids"].shape
        return lora_train_flops(fm, b * t, t)

    def tokens(self, batch: Batch) -> int:
        b, t = batch["input_ids"].shape
        return int(b * t)
