"""Beam prediction with a large model: a user's features (or past beams) in, the best DFT beam out.

A sample (``channels.beam_data.BeamSample``) is one DeepMIMO New York user: its position (or its
strongest paths) as features, or the oracle beams of the users before it along a street
(``beams.features: track``); the label is its oracle beam, the argmax of the codebook's gains.

The model puts a decoder backbone between a small input module and a head, as the channel predictor
(``tasks/channel.py``, LLM4CP-style) does: features go (with Fourier features) through an MLP to ``TOKENS`` tokens of the
backbone's width (past beams: a learned embedding per beam index), each plus a learned position;
the backbone's blocks run on them (``inputs_embeds``: the LM's token embedding and LM head are not
used); the outputs are mean-pooled and a linear head scores every beam. LoRA adapts the backbone's
attention; the input module, the head and the backbone's norms are trained in full in
``modules_to_save``, so they travel with the adapter. Loss: cross-entropy to the oracle beam (the
usual beam-prediction loss, e.g. Alkhateeb et al., IEEE Access 2018). Metrics: top-1 / top-3
accuracy and the gain loss, the mean over users of 10 log10(gain[oracle] / gain[predicted]) in dB
(``channels.beams.gain_loss_db``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from edgelam.channels.beam_data import BeamSample, build_beam_data
from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import base_seed, fresh_base
from edgelam.models.lora import attach_lora, load_adapters
from edgelam.models.split import EmbedPart, PooledHeadPart, SplitParts, is_encoder
from edgelam.tasks.base import Batch, TaskSetup
from edgelam.tasks.channel import NORMS

__all__ = ["BeamPrediction", "BeamPredictor", "BeamSample"]
EMBED, HEAD = "beam_embed", "beam_head"
TOKENS = 4  # tokens a feature vector becomes: a few positions for the backbone's attention to mix
FREQUENCIES = 4  # Fourier frequencies per feature (``FeatureEmbed``)
TOP_K = 3  # the top-k accuracy reported besides top-1, and the beams an answer lists
TRACK = "track"
FEATURES = ("position", "paths", TRACK)  # config_channels.BeamConfig.features


class FeatureEmbed(nn.Module):
    """(B, F) -> (B, T, d): Fourier features of the input, an MLP to T tokens of width d, plus a
    position per token. Each feature x also enters as sin / cos(2^k pi x), k < ``frequencies``
    (Tancik et al., NeurIPS 2020): the best beam turns over 64 narrow beams across a street, a map
    too sharp for a small MLP on raw coordinates to learn in a few federated rounds (it reaches the
    same top-1 in about half the steps)."""

    def __init__(self, features: int, tokens: int, d_model: int, frequencies: int = FREQUENCIES,
                 hidden: int = 128) -> None:
        super().__init__()
        self.tokens = tokens
        self.register_buffer("omega", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)  # (K,)
        self.mlp = nn.Sequential(nn.Linear(features * (1 + 2 * frequencies), hidden), nn.GELU(),
                                 nn.Linear(hidden, tokens * d_model))
        self.position = nn.Parameter(torch.zeros(tokens, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()  # (B, F)
        omega: Tensor = self.omega  # type: ignore[assignment]  # a buffer
        angle = (x[..., None] * omega).flatten(1)  # (B, F K)
        z = torch.cat([x, angle.sin(), angle.cos()], dim=1)  # (B, F (1 + 2K))
        return self.mlp(z).view(x.shape[0], self.tokens, -1) + self.position  # type: ignore[no-any-return]


class TrackEmbed(nn.Module):
    """(B, L) past beam indices -> (B, L, d): a learned vector per beam plus a position per step."""

    def __init__(self, n_beams: int, steps: int, d_model: int) -> None:
        super().__init__()
        self.beam = nn.Embedding(n_beams, d_model)
        self.position = nn.Parameter(torch.zeros(steps, d_model))

    def forward(self, past: Tensor) -> Tensor:
        return self.beam(past.long()) + self.position  # type: ignore[no-any-return]


class BeamPredictor(nn.Module):
    """Features (B, F) or past beams (B, L) -> beam logits (B, n_beams) through a decoder backbone."""

    def __init__(self, backbone: nn.Module, embed: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone  # a Hugging Face decoder's base model (LlamaModel...): takes inputs_embeds
        self.beam_embed = embed
        self.beam_head = head
        self.config = getattr(backbone, "config")  # read by models.flops.flop_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, inputs: Tensor) -> Tensor:
        tokens = self.beam_embed(inputs)  # (B, T, d)
        dtype = next(self.backbone.parameters()).dtype  # the backbone's weights' (as tasks/channel.py)
        hidden = self.backbone(inputs_embeds=tokens.to(dtype)).last_hidden_state  # (B, T, d)
        return self.beam_head(hidden.float().mean(dim=1))  # type: ignore[no-any-return]  # (B, n_beams)


class BeamPrediction:
    name: ClassVar[str] = "beam_prediction"
    generates: ClassVar[bool] = False

    def __init__(self, n_beams: int, features: str, features_in: int, n_tx: int, track_length: int,
                 tokens: int = TOKENS, frequencies: int = FREQUENCIES) -> None:
        self.n_beams, self.features, self.features_in = n_beams, features, features_in
        self.n_tx, self.track_length, self.frequencies = n_tx, track_length, frequencies
        self.track = features == TRACK
        self.positions = features_in if self.track else tokens  # tokens one sample takes in the backbone
        self.key = "past_beams" if self.track else "features"  # the batch's input tensor

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        data, shape = build_beam_data(cfg.beams, cfg.data, cfg.seed)  # first: a missing data folder fails fast
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed))
        task = cls(shape.n_beams, shape.features, shape.features_in, shape.n_tx, shape.track_length)
        return TaskSetup(task, base, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        """The decoder's base model (its blocks and final norm; a new copy: it is wrapped in place)."""
        if is_encoder(model):
            raise ConfigError(f"model.name '{model}' is an encoder; beam_prediction needs a decoder backbone "
                              f"(tiny, smollm2, a Hugging Face id)")
        base = fresh_base(model, dtype, seed)
        return getattr(base.model, "model"), base.tokenizer

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "BeamPrediction":
        if card.get("features") not in FEATURES:
            raise ValueError(f"a beam_prediction card's features must be one of {list(FEATURES)}, got {card.get('features')!r}")
        try:
            return cls(int(card["n_beams"]), str(card["features"]), int(card["features_in"]), int(card["n_tx"]),
                       int(card["track_length"]), int(card.get("tokens", TOKENS)), int(card.get("frequencies", FREQUENCIES)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a beam_prediction card needs n_beams, features, features_in, n_tx, track_length "
                             f"({exc})") from None

    def predictor(self, backbone: nn.Module, seed: int) -> BeamPredictor:
        d = int(getattr(backbone, "config").hidden_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            embed: nn.Module = TrackEmbed(self.n_beams, self.positions, d) if self.track \
                else FeatureEmbed(self.features_in, self.positions, d, self.frequencies)
            head = nn.Linear(d, self.n_beams)
        return BeamPredictor(backbone, embed, head)

    def split_parts(self, model: BeamPredictor) -> SplitParts:
        """For split learning: the feature (or past-beam) encoder and the head on the device, the
        backbone's blocks cut between the device and the edge server."""
        return SplitParts(self.key, self.positions, EmbedPart(model.beam_embed), PooledHeadPart(model.beam_head))

    def collate(self, samples: Sequence[BeamSample]) -> Batch:
        return {self.key: torch.stack([s.inputs for s in samples]),
                "label": torch.tensor([s.label for s in samples], dtype=torch.long),
                "gains": torch.stack([s.gains for s in samples])}

    def size(self, sample: BeamSample) -> int:
        return self.positions

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> Any:
        return attach_lora(self.predictor(base, seed), lora, seed=seed, task_type=None,
                           modules_to_save=(EMBED, HEAD, *NORMS))

    def output(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(inputs=batch[self.key])
        return out

    def loss(self, model: Any, batch: Batch) -> Tensor:
        return self.head_loss(self.output(model, batch), batch)

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        return self.head_sums(self.output(model, batch), batch)

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(output.float(), batch["label"])

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Summed cross-entropy, users, top-1 and top-k hits, and each user's gain loss in dB summed."""
        logits, label, gains = output.float(), batch["label"], batch["gains"].double()
        top = logits.topk(min(TOP_K, self.n_beams), dim=-1).indices  # (B, k)
        got = gains.gather(1, top[:, :1]).squeeze(1).clamp_min(1e-30)  # (B,) gain of the predicted beam
        loss_db = 10 * torch.log10(gains.max(dim=1).values / got)  # (B,) >= 0
        return {"loss_sum": float(nn.functional.cross_entropy(logits, label, reduction="sum")),
                "count": int(label.shape[0]), "correct1": int((top[:, 0] == label).sum()),
                "correct3": int((top == label[:, None]).any(dim=1).sum()), "gain_loss_db_sum": float(loss_db.sum())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("count", 0)
        if not n:
            return {"loss": math.nan, "top1": math.nan, "top3": math.nan, "gain_loss_db": math.nan}
        return {"loss": sums["loss_sum"] / n, "top1": sums.get("correct1", 0) / n, "top3": sums.get("correct3", 0) / n,
                "gain_loss_db": sums.get("gain_loss_db_sum", 0.0) / n}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """The backbone's LoRA training FLOPs over ``positions`` tokens per sample (the input module
        and head are counted among ``fm``'s linear layers per token)."""
        return lora_train_flops(fm, self.tokens(batch), self.positions)

    def tokens(self, batch: Batch) -> int:
        return int(batch[self.key].shape[0]) * self.positions

    # --- serving ---

    def card(self) -> dict[str, Any]:
        return {"n_beams": self.n_beams, "n_tx": self.n_tx, "features": self.features, "features_in": self.features_in,
                "track_length": self.track_length, "tokens": self.positions, "frequencies": self.frequencies}

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        if not adapters:
            raise ValueError("a beam predictor's input module and head are trained: serve the adapter folder of a "
                             "beam_prediction run (edgelam serve --adapter NAME=RUN/adapter)")
        return load_adapters(self.predictor(base, seed=0), dict(adapters))

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """Inputs are feature vectors (``features_in`` numbers each) or, for features 'track', lists of
        ``track_length`` past beam indices, oldest first."""
        what = "past beam indices (integers)" if self.track else "numbers"
        ints = all(isinstance(x, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in x) for x in inputs)
        if self.track and not ints:  # torch.tensor would truncate 3.7 to beam 3
            raise ValueError(f"each input must be a list of {self.features_in} {what}")
        try:
            x = torch.tensor(inputs, dtype=torch.long if self.track else torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"each input must be a list of {self.features_in} {what} ({exc})") from None
        return self.wire_inputs({self.key: x})

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        x = tensors.get(self.key)
        kind = "an int32 / int64" if self.track else "a float"
        typed = x is not None and (x.dtype in (torch.int32, torch.int64) if self.track else x.is_floating_point())
        if x is None or not typed or x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != self.features_in:
            got = "none" if x is None else f"{x.dtype} {tuple(x.shape)}"
            raise ValueError(f"expected {kind} tensor '{self.key}' of shape (batch >= 1, {self.features_in}); got {got}")
        if self.track and (int(x.min()) < 0 or int(x.max()) >= self.n_beams):
            raise ValueError(f"'{self.key}' must hold beam indices in [0, {self.n_beams})")
        if not self.track and not bool(torch.isfinite(x).all()):
            raise ValueError(f"'{self.key}' holds NaN or infinite values")
        return {self.key: x.long() if self.track else x.float()}

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """Every beam's probability (B, n_beams) and the best beam (B,)."""
        probs = torch.softmax(output.float(), dim=-1)
        return {"beam": probs.argmax(dim=-1), "scores": probs}

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        """Per input: the best beam and the top 3 beams with their probabilities (not all n_beams)."""
        top = predicted["scores"].topk(min(TOP_K, self.n_beams), dim=-1)
        return [{"beam": int(b), "top3": i, "top3_scores": [round(p, 6) for p in v]}
                for b, i, v in zip(predicted["beam"].tolist(), top.indices.tolist(), top.values.tolist())]
