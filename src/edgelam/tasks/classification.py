"""Text classification: an encoder (tiny-encoder, minilm, ``encoder:<id>``) with a mean-pool linear
head, cross-entropy over the classes, accuracy.

A sample is ``data.classification.Labeled`` (token ids and a class index). LoRA adapts the
encoder; the head (``models.split.ClassifierHead``, as the split path's) is trained in full and
sits in PEFT's ``modules_to_save``, so it is part of the adapter state: it travels with the LoRA
factors, is counted in bytes, and a saved adapter folder reloads with
``PeftModel.from_pretrained(EncoderClassifier(encoder, any head of the same shape), path)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.data.build import ClientData, FederatedData
from edgelam.data.classification import Labeled, build_classification, collate_labeled
from edgelam.data.poison import poison_for
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import base_seed
from edgelam.models.lora import attach_lora, load_adapters
from edgelam.models.split import ClassifierHead, fresh_encoder, is_encoder, load_encoder
from edgelam.tasks.base import Batch, TaskSetup, texts, token_inputs

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


def _check_encoder(model: str) -> None:
    if not is_encoder(model):
        raise ConfigError(f"model.name '{model}' is not an encoder; task classification needs tiny-encoder, "
                          f"minilm or encoder:<hf id or folder>")


def classifier_model(backbone: nn.Module, num_classes: int, seed: int) -> EncoderClassifier:
    """The unwrapped classifier over ``backbone``; the head's initial weights depend only on ``seed``."""
    return EncoderClassifier(backbone, ClassifierHead(int(getattr(backbone, "config").hidden_size), num_classes, seed))


class Classification:
    name: ClassVar[str] = "classification"
    generates: ClassVar[bool] = False

    def __init__(self, pad_id: int, num_classes: int, classes: tuple[str, ...] = ()) -> None:
        if num_classes < 2:
            raise ConfigError(f"a classifier needs >= 2 classes (got {num_classes})")
        self.pad_id, self.num_classes = pad_id, num_classes
        self.classes = classes or tuple(str(i) for i in range(num_classes))  # the class names, in label order

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        """The encoder and its tokenizer; each client's share of the source's training set (no
        held-out share: evaluation uses the source's test set, as the split driver does)."""
        backbone, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed), fresh=False)
        cd = build_classification(cfg.data, tok, cfg.seed, cfg.eval.max_per_task, poison_for(cfg.fl.attack, cfg.seed))
        clients = [ClientData(k, train=list(samples), heldout=[]) for k, samples in enumerate(cd.clients)]
        data = FederatedData(clients, {cfg.data.source: list(cd.test)}, {}, cd.description, list(cd.backdoor))
        return TaskSetup(cls(int(tok.pad_token_id), len(cd.classes), tuple(cd.classes)), backbone, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        """The encoder and its tokenizer: a new copy (``fresh``: it will be wrapped in place) or the
        per-process cached one."""
        _check_encoder(model)
        backbone, tok = (fresh_encoder if fresh else load_encoder)(model, seed)
        return backbone.to(getattr(torch, dtype)), tok

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "Classification":
        classes = card.get("classes")
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"a classification card needs 'classes', a list of >= 2 class names; got {classes!r}")
        return cls(int(tokenizer.pad_token_id), len(classes), tuple(classes))

    def size(self, sample: Labeled) -> int:
        return len(sample.input_ids)

    def collate(self, samples: Sequence[Labeled]) -> Batch:
        return collate_labeled(list(samples), self.pad_id)

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        return attach_lora(classifier_model(base, self.num_classes, seed), lora, seed=seed, task_type=None,
                           modules_to_save=(HEAD,))

    def output(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.float()  # (B, C)

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        return self.head_loss(self.output(model, batch), batch)

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        return self.head_sums(self.output(model, batch), batch)

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


    # --- serving ---

    def card(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        """The encoder with a head per adapter (LoRA and head both from the folder)."""
        if not adapters:
            raise ValueError("a classifier's head is trained: serve an adapter folder of a classification run "
                             "(edgelam serve --adapter NAME=RUN/adapter)")
        return load_adapters(classifier_model(base, self.num_classes, seed=0), dict(adapters))

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """Texts tokenized as the data reader does (``data.classification.tokenize``), right-padded."""
        ids = tokenizer(texts(inputs), truncation=True, max_length=max_length)["input_ids"]
        batch = collate_labeled([Labeled(tuple(x), 0, "request") for x in ids], self.pad_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        return token_inputs(tensors)

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """Class probabilities (B, C) and the predicted class (B,)."""
        probs = torch.softmax(output.float(), dim=-1)
        return {"label_ids": probs.argmax(dim=-1), "scores": probs}

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        """Per input: the predicted class name, its probability and every class's probability."""
        out = []
        for lab, probs in zip(predicted["label_ids"].tolist(), predicted["scores"].tolist()):
            out.append({"label": self.classes[lab], "score": probs[lab], "scores": dict(zip(self.classes, probs))})
        return out


def to_classifier_adapter(folder: Path, head: dict[str, Tensor]) -> None:
    """Rewrite a PEFT folder of LoRA on the bare encoder (what split learning trains) with the
    trained ``head`` (``ClassifierHead`` state) into this task's adapter: the LoRA under
    ``backbone.``, the head in ``modules_to_save``; one loader then serves both."""
    prefix = "base_model.model."
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    if any(not k.startswith(prefix) for k in state):
        raise ValueError(f"{folder}: adapter keys do not start with '{prefix}'")
    moved = {f"{prefix}backbone.{k.removeprefix(prefix)}": v for k, v in state.items()}
    moved |= {f"{prefix}{HEAD}.{k}": v.detach().contiguous() for k, v in head.items()}
    config["modules_to_save"] = [HEAD]
    save_file(moved, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
