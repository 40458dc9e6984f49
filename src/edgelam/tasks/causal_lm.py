"""Causal-LM text: chat-formatted (or plain) text, loss on the answer tokens, perplexity.

A sample is ``data.format.Encoded`` (token ids and labels, IGNORE on the prompt); the model is a
decoder with its own LM head, so LoRA is the only trainable part (``model.train: full``: chosen
decoder blocks in full instead, ``models/full.py``). Numbers are token-weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.data.build import build_federated_data, resolve_auto
from edgelam.data.poison import poison_for
from edgelam.data.format import IGNORE, Encoded, collate
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import base_seed, fresh_base, load_base
from edgelam.models.full import attach_full
from edgelam.models.lora import attach_lora, load_adapters
from edgelam.models.split import is_encoder
from edgelam.tasks.base import Batch, TaskSetup, texts, token_inputs


class CausalLM:
    name: ClassVar[str] = "causal_lm"
    generates: ClassVar[bool] = True

    def __init__(self, pad_id: int, train: str = "lora", full_blocks: tuple[int, ...] | None = None) -> None:
        self.pad_id = pad_id
        self.train, self.full_blocks = train, full_blocks  # model.train, model.full_blocks

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        # model.train full wraps a copy: PEFT's unload (at a run's end) leaves the trained blocks in
        # place of the originals, which must not reach the per-process cached base
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed),
                             fresh=cfg.model.train == "full")
        data = build_federated_data(resolve_auto(cfg.data)[0], tok, cfg.seed,  # the Python API may pass auto
                                    poison_for(cfg.fl.attack, cfg.seed))
        return TaskSetup(cls(int(tok.pad_token_id), cfg.model.train, cfg.model.full_blocks), base, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        """The decoder and its tokenizer: a new copy (``fresh``: it will be wrapped in place) or
        the per-process cached one."""
        if is_encoder(model):
            raise ConfigError(f"model.name '{model}' is an encoder; task causal_lm needs a causal LM "
                              f"(tiny, smollm2, a Hugging Face id); an encoder trains task classification")
        base = (fresh_base if fresh else load_base)(model, dtype, seed)
        return base.model, base.tokenizer

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "CausalLM":
        return cls(int(tokenizer.pad_token_id))

    def size(self, sample: Encoded) -> int:
        return len(sample.input_ids)

    def collate(self, samples: Sequence[Encoded]) -> Batch:
        return collate(list(samples), self.pad_id)

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        if self.train == "full":  # the chosen blocks' own weights are the adapter; model.lora is not used
            return attach_full(base, self.full_blocks)
        return attach_lora(base, lora, seed=seed)

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        # Keep only the loss: holding the model output (logits, (B, T, V)) into the next
        # forward costs fresh allocations of ~100 MB per step on SmolLM2.
        loss: Tensor = model(**batch).loss
        return loss

    def output(self, model: Any, batch: Batch) -> Tensor:
        """The logits (B, T, V): at each position, the next token's."""
        logits: Tensor = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        """Summed next-token cross-entropy over the answer tokens and their number."""
        return self.head_sums(self.output(model, batch), batch)

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

    # --- serving ---

    def card(self) -> dict[str, Any]:
        return {}

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        return load_adapters(base, dict(adapters)) if adapters else base

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """Raw text (no chat template), right-padded; each answer is the token after its text."""
        ids = tokenizer(texts(inputs), truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
        if any(not x for x in ids):
            raise ValueError("an input encodes to no tokens")
        return collate([Encoded(tuple(x), tuple(x), "request") for x in ids], self.pad_id)

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        return token_inputs(tensors)

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """The greedy next token and its probability at every position (B, T)."""
        top_p, top_i = torch.softmax(output.float(), dim=-1).max(dim=-1)
        return {"token_ids": top_i, "top_prob": top_p}

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        """Per input, the greedy token after its last one."""
        last = batch["attention_mask"].sum(dim=1) - 1
        out = []
        for i, j in enumerate(last.tolist()):
            tok = int(predicted["token_ids"][i, j])
            out.append({"next_token": tokenizer.decode([tok]), "token_id": tok,
                        "prob": float(predicted["top_prob"][i, j])})
        return out
