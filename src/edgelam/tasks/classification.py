"""Text classification: an encoder (tiny-encoder, minilm, ``encoder:<id>``) with a mean-pool linear
head, cross-entropy over the classes, accuracy.

A sample is ``data.classification.Labeled`` (token ids and a class index). LoRA adapts the
encoder; the head (``models.split.ClassifierHead``, as the split path's) is trained in full and
sits in PEFT's ``modules_to_save``, so it is part of the adapter state: it travels with the LoRA
factors, is counted in bytes, and a saved adapter folder reloads with
``PeftModel.from_pretrained(EncoderClassifier(encoder, any head of the same shape), path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.data.build import ClientData, FederatedData
from edgelam.data.classification import Labeled, build_classification, collate_labeled
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.lora import attach_lora
from edgelam.models.split import ClassifierHead, is_encoder, load_encoder
from edgelam.tasks.base import Batch, TaskSetup

HEAD = "classifier"  # the head's module name, listed in modules_to_save


class EncoderClassifier(nn.Module):
    """(input_ids, attention_mask) (B, T) -> class logits (B, C): the encoder's last hidden states,
    mean-pooled over the non-padded tokens, through a linear layer."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = head
        self.config = getattr(backbone, "config")  # read by models.flops.flop_model

    @property
    def device(self) -> torch.device:  # as a Hugging Face model has (the training loop moves batches there)
        return next(self.parameters()).device

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.classifier(hidden, attention_mask)  # type: ignore[no-any-return]  # (B, C)


def classifier_model(backbone: nn.Module, num_classes: int, seed: int) -> EncoderClassifier:
    """The unwrapped classifier over ``backbone``; the head's initial weights depend only on ``seed``."""
    return EncoderClassifier(backbone, ClassifierHead(int(getattr(backbone, "config").hidden_size), num_classes, seed))


class Classification:
    name = "classification"

    def __init__(self, pad_id: int, num_classes: int, classes: tuple[str, ...] = ()) -> None:
        if num_classes < 2:
            raise ConfigError(f"a classifier needs >= 2 classes (got {num_classes})")
        self.pad_id, self.num_classes = pad_id, num_classes
        self.classes = classes or tuple(str(i) for i in range(num_classes))  # the class names, in label order

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        """The encoder and its tokenizer; each client's share of the source's training set (no
        held-out share: evaluation uses the source's test set, as the split driver does)."""
        if not is_encoder(cfg.model.name):
            raise ConfigError(f"model.name '{cfg.model.name}' is not an encoder; task classification needs tiny-encoder, "
                              f"minilm or encoder:<hf id or folder>")
        backbone, tok = load_encoder(cfg.model.name, cfg.seed if cfg.model.name == "tiny-encoder" else 0)
        cd = build_classification(cfg.data, tok, cfg.seed, cfg.eval.max_per_task)
        clients = [ClientData(k, train=list(samples), heldout=[]) for k, samples in enumerate(cd.clients)]
        data = FederatedData(clients, {cfg.data.source: list(cd.test)}, {}, cd.description)
        return TaskSetup(cls(int(tok.pad_token_id), len(cd.classes), tuple(cd.classes)), backbone, tok, data)

    def collate(self, samples: Sequence[Labeled]) -> Batch:
        return collate_labeled(list(samples), self.pad_id)

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        return attach_lora(classifier_model(base, self.num_classes, seed), lora, seed=seed, task_type=None,
                           modules_to_save=(HEAD,))

    def logits(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.float()  # (B, C)

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        return self.head_loss(self.logits(model, batch), batch)

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        return self.head_sums(self.logits(model, batch), batch)

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        """Mean cross-entropy over the examples; ``output`` is the logits (B, C)."""
        return F.cross_entropy(output.float(), batch["labels"])

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Summed cross-entropy, examples and correct predictions (argmax) of a batch."""
        logits, labels = output.float(), batch["labels"]
        return {"loss_sum": float(F.cross_entropy(logits, labels, reduction="sum")), "count": int(labels.numel()),
                "correct": int((logits.argmax(-1) == labels).sum())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("count", 0)
        if not n:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0) / n}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """LoRA training FLOPs over the padded tokens; ``fm`` counts the head's small matmul (hidden x C)
        per token although it runs once per example, an overcount well under 1% of the encoder's."""
        b, t = batch["input_ids"].shape
        return lora_train_flops(fm, b * t, t)

    def tokens(self, batch: Batch) -> int:
        b, t = batch["input_ids"].shape
        return int(b * t)

