"""Channel prediction with a large model (LLM4CP-style): past CSI slots in, future CSI out, NMSE.

A sample (``CsiSample``) is one BS antenna link: ``past`` (P, 2S) and ``future`` (F, 2S') real
tensors (real parts, then imaginary parts, of S subcarriers). TDD predicts the next F uplink
slots on the same S subcarriers; FDD the downlink band (the adjacent S subcarriers) over the same
F slots from the uplink band's past (``channels.mode``).

The model follows LLM4CP (Liu et al. 2024; papers.md §4.1) on a decoder backbone:
instance-normalise the past; embed each slot from two branches, the frequency domain and the
delay domain (an IFFT over subcarriers), each an MLP; add a learned position per slot; run the
backbone's blocks on these embeddings (``inputs_embeds``: the LM's token embedding and LM head
are not used); a linear head maps each output to 2S' and a linear layer over time maps P slots
to F; add the last past slot (a residual: training starts from "no prediction" and learns the
change, which converges in the few local steps a federated round affords; LLM4CP has no
residual and trains 500 epochs; FDD predicts another band and has none); de-normalise. LoRA adapts the backbone's attention; the input module, the head and (as
LLM4CP trains them) the backbone's norms are trained in full in ``modules_to_save``, so they
travel with the adapter. Loss: the mean per-sample NMSE ||H_hat - H||^2 / ||H||^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.models.flops import FlopModel, lora_train_flops
from edgelam.models.load import base_seed, fresh_base
from edgelam.models.lora import attach_lora, load_adapters
from edgelam.channels.data import build_channel_data
from edgelam.channels.samples import CsiSample, complex_to_real, nmse_per_sample, real_to_complex
from edgelam.models.split import SplitParts, is_encoder
from edgelam.tasks.base import Batch, TaskSetup

__all__ = ["ChannelPrediction", "ChannelPredictor", "CsiSample", "complex_to_real", "nmse_per_sample"]
EMBED, HEAD = "csi_embed", "csi_head"
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")  # Llama-family names (SmolLM2, tiny)


class CsiEmbed(nn.Module):
    """(B, P, 2S) -> (B, P, d): frequency and delay branches (an MLP each) plus a position per slot."""

    def __init__(self, features: int, slots: int, d_model: int, hidden: int = 128) -> None:
        super().__init__()
        self.freq = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.delay = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.position = nn.Parameter(torch.zeros(slots, d_model))

    def forward(self, x: Tensor) -> Tensor:
        delay = complex_to_real(torch.fft.ifft(real_to_complex(x), dim=-1, norm="ortho"))
        return self.freq(x) + self.delay(delay) + self.position  # type: ignore[no-any-return]


class CsiHead(nn.Module):
    """(B, P, d) -> (B, F, 2S'): per slot d -> 2S', then P -> F over time. The output layer starts
    at zero, so an untrained predictor answers the last past slot (see ``ChannelPredictor``)."""

    def __init__(self, d_model: int, features_out: int, slots_in: int, slots_out: int) -> None:
        super().__init__()
        self.out = nn.Linear(d_model, features_out)
        self.time = nn.Linear(slots_in, slots_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.zeros_(self.time.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.time(self.out(hidden).transpose(1, 2)).transpose(1, 2)  # type: ignore[no-any-return]


class ChannelPredictor(nn.Module):
    """Past CSI (B, P, 2S) -> predicted future CSI (B, F, 2S') through a decoder backbone."""

    def __init__(self, backbone: nn.Module, embed: CsiEmbed, head: CsiHead) -> None:
        super().__init__()
        self.backbone = backbone  # a Hugging Face decoder's base model (LlamaModel...): takes inputs_embeds
        self.csi_embed = embed
        self.csi_head = head
        self.config = getattr(backbone, "config")  # read by models.flops.flop_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, past: Tensor) -> Tensor:
        tokens = embed_past(self.csi_embed, past)
        dtype = next(self.backbone.parameters()).dtype
        hidden = self.backbone(inputs_embeds=tokens.to(dtype)).last_hidden_state
        return head_future(self.csi_head, hidden, past)


def normalise(past: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(instance-normalised past, its mean, its std) per sample."""
    mean = past.mean(dim=(1, 2), keepdim=True)
    std = past.std(dim=(1, 2), keepdim=True) + 1e-6
    return (past - mean) / std, mean, std


def embed_past(embed: nn.Module, past: Tensor) -> Tensor:
    """The backbone's input embeddings (B, P, d) of raw past CSI (B, P, 2S)."""
    return embed(normalise(past)[0])  # type: ignore[no-any-return]


def head_future(head: nn.Module, hidden: Tensor, past: Tensor) -> Tensor:
    """The predicted future (B, F, 2S') from the backbone's output and the raw past it saw."""
    x, mean, std = normalise(past)
    delta = head(hidden.float())
    last = x[:, -1:, :] if delta.shape[-1] == x.shape[-1] else 0.0  # FDD (another band): no residual
    return (last + delta) * std + mean  # type: ignore[no-any-return]


class _SplitIn(nn.Module):
    """Split learning's device-side input module: past CSI -> embeddings (``embed_past``)."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.csi_embed = embed

    def forward(self, past: Tensor) -> Tensor:
        return embed_past(self.csi_embed, past)


class _SplitOut(nn.Module):
    """Split learning's device-side head: the final norm's output and the past -> future CSI."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.csi_head = head

    def forward(self, hidden: Tensor, past: Tensor) -> Tensor:
        return head_future(self.csi_head, hidden, past)


class ChannelPrediction:
    name: ClassVar[str] = "channel_prediction"
    generates: ClassVar[bool] = False

    def __init__(self, past: int, future: int, features_in: int, features_out: int, seed: int = 0,
                 tune_norms: bool = True, backbone_layers: int | None = None) -> None:
        self.past, self.future = past, future
        self.features_in, self.features_out = features_in, features_out
        self.seed, self.tune_norms, self.backbone_layers = seed, tune_norms, backbone_layers

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed))
        data, shape = build_channel_data(cfg.channels, cfg.data, cfg.seed)
        ch = cfg.channels
        task = cls(shape.past, shape.future, shape.features_in, shape.features_out, cfg.seed, ch.tune_norms,
                   ch.backbone_layers)
        return TaskSetup(task, base, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        """The decoder's base model (its blocks and final norm; a new copy: it is wrapped in place)."""
        if is_encoder(model):
            raise ConfigError(f"model.name '{model}' is an encoder; channel_prediction needs a decoder backbone "
                              f"(tiny, smollm2, a Hugging Face id)")
        base = fresh_base(model, dtype, seed)
        return getattr(base.model, "model"), base.tokenizer

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "ChannelPrediction":
        try:
            layers = card.get("backbone_layers")
            return cls(int(card["past"]), int(card["future"]), int(card["features_in"]), int(card["features_out"]),
                       0, bool(card.get("tune_norms", True)), None if layers is None else int(layers))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a channel_prediction card needs past, future, features_in, features_out ({exc})") from None

    def predictor(self, backbone: nn.Module, seed: int) -> ChannelPredictor:
        """The predictor around ``backbone`` (cut to its first ``backbone_layers`` blocks, in place)."""
        config: Any = getattr(backbone, "config")
        k = self.backbone_layers
        if k is not None:
            blocks: Any = getattr(backbone, "layers")
            if k > len(blocks):
                raise ConfigError(f"channels.backbone_layers {k} exceeds the backbone's {len(blocks)} blocks")
            setattr(backbone, "layers", blocks[:k])
            config.num_hidden_layers = k
        d = int(config.hidden_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            embed = CsiEmbed(self.features_in, self.past, d)
            head = CsiHead(d, self.features_out, self.past, self.future)
        return ChannelPredictor(backbone, embed, head)

    def split_parts(self, model: ChannelPredictor) -> SplitParts:
        """For split learning (2505.03139's decomposition by modality): the CSI encoder and the head on
        the device, the backbone's blocks cut between the device and the edge server."""
        return SplitParts("past", self.past, _SplitIn(model.csi_embed), _SplitOut(model.csi_head))

    def collate(self, samples: Sequence[CsiSample]) -> Batch:
        return {"past": torch.stack([s.past for s in samples]), "future": torch.stack([s.future for s in samples])}

    def size(self, sample: CsiSample) -> int:
        return self.past

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> Any:
        saved = (EMBED, HEAD, *(NORMS if self.tune_norms else ()))
        return attach_lora(self.predictor(base, seed), lora, seed=seed, task_type=None, modules_to_save=saved)

    def output(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(past=batch["past"])
        return out

    def loss(self, model: Any, batch: Batch) -> Tensor:
        return self.head_loss(self.output(model, batch), batch)

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        return self.head_sums(self.output(model, batch), batch)

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        return nmse_per_sample(output, batch["future"]).mean()

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Per-sample NMSE summed (the loss), and squared error and power summed (NMSE in dB)."""
        target = batch["future"].float()
        err = (output.float() - target).pow(2).sum()
        return {"loss_sum": float(nmse_per_sample(output, target).sum()), "count": int(target.shape[0]),
                "err_sum": float(err), "power_sum": float(target.pow(2).sum())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("count", 0)
        if not n:
            return {"loss": float("nan"), "nmse_db": float("nan")}
        ratio = sums.get("err_sum", 0.0) / max(sums.get("power_sum", 0.0), 1e-30)
        return {"loss": sums["loss_sum"] / n, "nmse_db": 10 * math.log10(max(ratio, 1e-30))}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """The backbone's LoRA training FLOPs over P tokens per sample (the input and output MLPs are
        counted among ``fm``'s linear layers per token)."""
        b = int(batch["past"].shape[0])
        return lora_train_flops(fm, b * self.past, self.past)

    def tokens(self, batch: Batch) -> int:
        return int(batch["past"].shape[0]) * self.past

    # --- serving ---

    def card(self) -> dict[str, Any]:
        return {"past": self.past, "future": self.future, "features_in": self.features_in,
                "features_out": self.features_out, "tune_norms": self.tune_norms, "backbone_layers": self.backbone_layers}

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        if not adapters:
            raise ValueError("a channel predictor's input module and head are trained: serve the adapter folder of a "
                             "channel_prediction run (edgelam serve --adapter NAME=RUN/adapter)")
        return load_adapters(self.predictor(base, seed=0), dict(adapters))

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """Inputs are past CSI, each a (P, 2S) nested list of numbers (real parts, then imaginary)."""
        try:
            past = torch.tensor(inputs, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"each input must be a {self.past} x {self.features_in} list of numbers ({exc})") from None
        if tuple(past.shape[1:]) != (self.past, self.features_in) or not bool(torch.isfinite(past).all()):
            raise ValueError(f"each input must be {self.past} slots x {self.features_in} finite numbers "
                             f"(got shape {tuple(past.shape[1:])})")
        return {"past": past}

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        past = tensors.get("past")
        if past is None or tuple(past.shape[1:]) != (self.past, self.features_in) or not past.is_floating_point():
            raise ValueError(f"expected a float tensor 'past' of shape (batch, {self.past}, {self.features_in})")
        if past.shape[0] == 0 or not bool(torch.isfinite(past).all()):
            raise ValueError("'past' must hold at least one sample of finite values")
        return {"past": past.float()}

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        return {"future": output.float()}

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        return [{"future": f.tolist()} for f in predicted["future"]]
