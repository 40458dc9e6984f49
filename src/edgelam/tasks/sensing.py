"""Activity recognition from Wi-Fi CSI with a large model: sensor windows in as tokens, the activity out.

A sample (``sensing.data.SensingSample``) is a window of W frames of F CSI amplitudes, each relative
to its mean over the window (``sensing.data.relative``). The window becomes T = W / P tokens of the backbone (``sensing/tokens.py``),
one of two ways (``sensing.tokenizer``):

- ``patch``: each patch of P frames, summarised by each feature's mean and std over its frames
  (``tokens.descriptors``, 2F numbers), projected linearly into the embedding space;
- ``vq``: the same summary replaced by its code in the federated codebook
  (``tokens.federated_codebook``), the codes new vocabulary entries of the model with their own
  trained embeddings (the base's vocabulary is untouched and frozen).

Both start from the same patch summary, so the two differ only in continuous vs discrete. (A
flattened P x F patch, 1,200 numbers for 10 frames of 120 amplitudes, let the projection memorise
the few hundred training windows of the tiny config: training loss 0.1, held-out accuracy at chance.)

A learned position is added per token; the decoder's blocks run on them (``inputs_embeds``);
the outputs are mean-pooled and a linear head scores each activity. LoRA adapts the backbone's
attention; the input module, the head and the backbone's norms are trained in full in
``modules_to_save``, so they travel with the adapter. Loss: cross-entropy. Metrics: accuracy and
macro-F1 (the mean over activities of each one's F1; an activity never predicted nor present
counts 0 only if present). ``sensing.token_error_rate`` evaluates over a lossy uplink: each token is
lost with that probability (a random code, or a zeroed patch), the same draws every evaluation.
The codebook is part of the task card, so a served model tokenizes raw windows as training did.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import base_seed, fresh_base
from edgelam.models.lora import attach_lora, load_adapters
from edgelam.models.split import EmbedPart, PooledHeadPart, SplitParts, is_encoder
from edgelam.sensing.data import SensingSample, build_sensing_data, relative
from edgelam.sensing.tokens import corrupt, descriptors, encode, patches
from edgelam.tasks.base import Batch, TaskSetup
from edgelam.tasks.channel import NORMS

__all__ = ["ActivityRecognition", "SensingPredictor", "SensingSample"]
EMBED, HEAD = "sensor_embed", "sensor_head"
TOKENIZERS = ("patch", "vq")
ERROR_SEED = 1234  # the lossy-uplink draws of an evaluation (the same every evaluation)


class SensorEmbed(nn.Module):
    """Tokens -> (B, T, d): a linear projection of continuous patch summaries (B, T, 2F), or an embedding
    per code (B, T) int64; plus a learned position per token."""

    def __init__(self, tokens: int, d_model: int, patch_features: int | None, codebook: int | None) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_features, d_model) if patch_features is not None else None
        self.codes = nn.Embedding(codebook, d_model) if codebook is not None else None
        self.position = nn.Parameter(torch.zeros(tokens, d_model))

    def forward(self, x: Tensor) -> Tensor:
        layer = self.codes if self.codes is not None else self.proj
        assert layer is not None
        return layer(x.long() if self.codes is not None else x.float()) + self.position  # type: ignore[no-any-return]


class SensingPredictor(nn.Module):
    """Tokens -> activity logits (B, C) through a decoder backbone."""

    def __init__(self, backbone: nn.Module, embed: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone  # a Hugging Face decoder's base model (LlamaModel...): takes inputs_embeds
        self.sensor_embed = embed
        self.sensor_head = head
        self.config = getattr(backbone, "config")  # read by models.flops.flop_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def pooled(self, tokens: Tensor) -> Tensor:
        """Token embeddings (B, T, d) -> the backbone's last hidden state averaged over tokens (B, d), float32."""
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(inputs_embeds=tokens.to(dtype)).last_hidden_state.float().mean(dim=1)  # type: ignore[no-any-return]

    def forward(self, inputs: Tensor) -> Tensor:
        return self.sensor_head(self.pooled(self.sensor_embed(inputs)))  # type: ignore[no-any-return]


def codebook_to_card(book: Tensor) -> dict[str, Any]:
    data = book.float().contiguous().numpy().astype("<f4").tobytes()
    return {"codebook_shape": list(book.shape), "codebook_f32": base64.b64encode(data).decode("ascii")}


def codebook_from_card(card: dict[str, Any]) -> Tensor:
    shape = tuple(int(x) for x in card["codebook_shape"])
    raw = base64.b64decode(card["codebook_f32"], validate=True)
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f"the card's codebook holds {len(raw)} bytes, not {4 * math.prod(shape)} for shape {shape}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).copy())


class ActivityRecognition:
    name: ClassVar[str] = "activity_recognition"
    generates: ClassVar[bool] = False

    def __init__(self, classes: Sequence[str], window: int, features: int, patch: int, tokenizer: str,
                 codebook: Tensor | None = None, token_error_rate: float = 0.0) -> None:
        if tokenizer not in TOKENIZERS or (tokenizer == "vq") != (codebook is not None):
            raise ValueError(f"tokenizer must be one of {list(TOKENIZERS)}, with a codebook exactly when 'vq'")
        self.classes = tuple(classes)
        self.window, self.features, self.patch, self.tokenizer = window, features, patch, tokenizer
        self.codebook, self.token_error_rate = codebook, token_error_rate
        self.positions = window // patch

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        data, shape = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)  # first: a missing data folder fails fast
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed))
        s = cfg.sensing
        task = cls(shape.classes, shape.window, shape.features, s.patch, s.tokenizer, shape.codebook, s.token_error_rate)
        return TaskSetup(task, base, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        """The decoder's base model (its blocks and final norm; a new copy: it is wrapped in place)."""
        if is_encoder(model):
            raise ConfigError(f"model.name '{model}' is an encoder; activity_recognition needs a decoder backbone "
                              f"(tiny, smollm2, a Hugging Face id)")
        base = fresh_base(model, dtype, seed)
        return getattr(base.model, "model"), base.tokenizer

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "ActivityRecognition":
        try:
            book = codebook_from_card(card) if card.get("tokenizer") == "vq" else None
            return cls([str(c) for c in card["classes"]], int(card["window"]), int(card["features"]),
                       int(card["patch"]), str(card["tokenizer"]), book)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"an activity_recognition card needs classes, window, features, patch, tokenizer "
                             f"(and the codebook for 'vq') ({exc})") from None

    def predictor(self, backbone: nn.Module, seed: int) -> SensingPredictor:
        d = int(getattr(backbone, "config").hidden_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            embed = self.sensor_embed(d)
            head = nn.Linear(d, len(self.classes))
        return SensingPredictor(backbone, embed, head)

    def sensor_embed(self, d_model: int) -> SensorEmbed:
        """A new input module for this task's tokens (patch projection or code embeddings, positions)."""
        return SensorEmbed(self.positions, d_model, 2 * self.features if self.codebook is None else None,
                           None if self.codebook is None else int(self.codebook.shape[0]))

    # --- tokens ---

    def tokenize(self, windows: Tensor) -> Tensor:
        """Relative windows (B, W, F) -> the model's input: patch descriptors (B, T, 2F) or their codes (B, T)."""
        d = descriptors(patches(windows.float(), self.patch))
        return d if self.codebook is None else encode(d, self.codebook)

    def collate(self, samples: Sequence[SensingSample]) -> Batch:
        return {"inputs": self.tokenize(torch.stack([s.window for s in samples])),
                "labels": torch.tensor([s.label for s in samples], dtype=torch.long)}

    def size(self, sample: SensingSample) -> int:
        return self.positions

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> Any:
        return attach_lora(self.predictor(base, seed), lora, seed=seed, task_type=None,
                           modules_to_save=(EMBED, HEAD, *NORMS))

    def split_parts(self, model: SensingPredictor) -> SplitParts:
        """For split learning (2505.03139's decomposition by modality): the sensor tokenizer and
        embedding and the head on the device, the backbone's blocks cut with the edge server."""
        return SplitParts("inputs", self.positions, EmbedPart(model.sensor_embed), PooledHeadPart(model.sensor_head))

    def output(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(inputs=batch["inputs"])
        return out

    def loss(self, model: Any, batch: Batch) -> Tensor:
        return self.head_loss(self.output(model, batch), batch)

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        if self.token_error_rate > 0:
            gen = torch.Generator().manual_seed(ERROR_SEED)
            size = None if self.codebook is None else int(self.codebook.shape[0])
            batch = batch | {"inputs": corrupt(batch["inputs"], self.token_error_rate, gen, size)}
        return self.head_sums(self.output(model, batch), batch)

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(output.float(), batch["labels"])

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Summed cross-entropy, windows, right answers, and per activity c: tp_c, fp_c, fn_c."""
        logits, labels = output.float(), batch["labels"]
        pred = logits.argmax(dim=-1)
        out: dict[str, float] = {"loss_sum": float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                                 "count": int(labels.shape[0]), "correct": int((pred == labels).sum())}
        for c in range(len(self.classes)):
            out[f"tp_{c}"] = int(((pred == c) & (labels == c)).sum())
            out[f"fp_{c}"] = int(((pred == c) & (labels != c)).sum())
            out[f"fn_{c}"] = int(((pred != c) & (labels == c)).sum())
        return out

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """loss, accuracy and macro-F1 over the activities present in the evaluated windows."""
        n = sums.get("count", 0)
        if not n:
            return {"loss": math.nan, "accuracy": math.nan, "macro_f1": math.nan}
        f1 = []
        for c in range(len(self.classes)):
            tp, fp, fn = (sums.get(f"{k}_{c}", 0) for k in ("tp", "fp", "fn"))
            if tp + fn:  # present among the evaluated windows
                f1.append(2 * tp / (2 * tp + fp + fn))
        return {"loss": sums["loss_sum"] / n, "accuracy": sums.get("correct", 0) / n,
                "macro_f1": sum(f1) / len(f1) if f1 else math.nan}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """The backbone's LoRA training FLOPs over T tokens per window (the input module and head
        are counted among ``fm``'s linear layers per token)."""
        return lora_train_flops(fm, self.tokens(batch), self.positions)

    def tokens(self, batch: Batch) -> int:
        return int(batch["inputs"].shape[0]) * self.positions

    # --- serving ---

    def card(self) -> dict[str, Any]:
        out: dict[str, Any] = {"classes": list(self.classes), "window": self.window, "features": self.features,
                               "patch": self.patch, "tokenizer": self.tokenizer}
        return out | (codebook_to_card(self.codebook) if self.codebook is not None else {})

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        if not adapters:
            raise ValueError("an activity recognizer's input module and head are trained: serve the adapter folder "
                             "of an activity_recognition run (edgelam serve --adapter NAME=RUN/adapter)")
        return load_adapters(self.predictor(base, seed=0), dict(adapters))

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """Inputs are raw CSI amplitude windows, each ``window`` frames x ``features`` numbers (the
        service normalises and tokenizes them as training did)."""
        try:
            w = torch.tensor(inputs, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"each input must be a {self.window} x {self.features} list of numbers ({exc})") from None
        if w.dim() != 3 or tuple(w.shape[1:]) != (self.window, self.features) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"each input must be {self.window} frames x {self.features} finite amplitudes "
                             f"(got shape {tuple(w.shape[1:])})")
        return {"inputs": self.tokenize(torch.from_numpy(relative(w.numpy())))}

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        x = tensors.get("inputs")
        want = (self.positions,) if self.codebook is not None else (self.positions, 2 * self.features)
        typed = x is not None and (x.dtype in (torch.int32, torch.int64) if self.codebook is not None
                                   else x.is_floating_point())
        if x is None or not typed or tuple(x.shape[1:]) != want or x.shape[0] == 0:
            got = "none" if x is None else f"{x.dtype} {tuple(x.shape)}"
            raise ValueError(f"expected tensor 'inputs' of shape (batch >= 1, {', '.join(map(str, want))}) "
                             f"({'codes' if self.codebook is not None else 'float patches'}); got {got}")
        if self.codebook is not None and (int(x.min()) < 0 or int(x.max()) >= int(self.codebook.shape[0])):
            raise ValueError(f"'inputs' must hold codes in [0, {int(self.codebook.shape[0])})")
        if self.codebook is None and not bool(torch.isfinite(x).all()):
            raise ValueError("'inputs' holds NaN or infinite values")
        return {"inputs": x.long() if self.codebook is not None else x.float()}

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """Every activity's probability (B, C) and the most likely one (B,)."""
        probs = torch.softmax(output.float(), dim=-1)
        return {"label": probs.argmax(dim=-1), "scores": probs}

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        return [{"label": self.classes[int(i)], "scores": {c: round(float(p), 6) for c, p in zip(self.classes, row)}}
                for i, row in zip(predicted["label"].tolist(), predicted["scores"].tolist())]
