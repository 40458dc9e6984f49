"""An early-exit draft for speculative decoding, distilled from the full model, trained federatedly.

The draft is the model's own embedding, blocks 0..K-1, final norm and LM head (``full:K`` in a
speculative topology: Elhoushi et al. 2024, LayerSkip; Zhang et al. 2024, Draft & Verify). LoRA
goes on those K blocks only; the final norm gets a trainable copy (PEFT ``modules_to_save``, so the
full model keeps its own); the LM head, tied to the embedding in SmolLM2, stays frozen. The teacher
is the full model with the adapter off (PEFT's ``disable_adapter``), optionally with a causal-LM
adapter merged into the base first (``draft.teacher_adapter``). The loss at every real token is
the distillation KL (Hinton et al. 2015, eq. 1-2; DistillSpec, Zhou et al. 2024, uses the same
forward KL for drafts):

    KL(p_T || p_S) tau^2,  p = softmax(logits / tau)

averaged over the positions where a draft drafts: those whose next token is an answer token
(``draft.positions: answer``; ``all``: every real token, prompts too, which on SmolLM2 taught the
draft the prompts' text and chat template and nothing of the answers). Greedy verification accepts
a drafted token when the draft's argmax equals the target's, so ``eval_agreement`` (teacher-forced
top-1 agreement at the same positions) is the acceptance rate the draft would reach on that text.

What the draft learns on (``draft.data``): the clients' own texts, or (``teacher``) their prompts with
the teacher's greedy answers, generated once when the run is set up: the text a device logs while the
target serves it, the text a draft must predict (on-policy data, as DistillSpec recommends). The
answers are the target's work at serving time, so they are not on the training clock.

A sample is the causal LM's (``data.format.Encoded``); collation, requests and answers are
``CausalLM``'s. The adapter a run saves carries the task card (``exit_layer``), so
``edgelam serve --module full:K --adapter draft=RUN/adapter`` and a speculative topology's
``draft_adapter`` serve the trained draft.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from edgelam.config import ConfigError, RunConfig
from edgelam.config import LoraConfig as LoraSettings
from edgelam.data.build import FederatedData, build_federated_data, resolve_auto
from edgelam.data.format import IGNORE, Encoded
from edgelam.models.flops import FlopModel, flop_model, forward_flops, lora_train_flops, module_flop_model
from edgelam.models.load import base_seed
from edgelam.models.lora import load_adapters
from edgelam.tasks.base import Batch, TaskSetup
from edgelam.tasks.causal_lm import CausalLM

TEACHER_LOGITS = "teacher_logits"  # the batch key head_loss / head_sums read the teacher's logits from
CARD = "edgelam_task.json"  # tasks/serving.CARD (not imported: tasks/serving.py imports this package)


# --- the maths and the forward passes (pure functions) ---


def distill_kl(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, int]:
    """(sum over the positions in ``mask`` of KL(p_T || p_S) tau^2, their number); logits (B, T, V), mask (B, T)."""
    keep = mask.bool()
    log_s = F.log_softmax(student[keep].float() / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")  # sum p_T (log p_T - log p_S)
    return kl * temperature ** 2, int(keep.sum())


def kl_positions(batch: Batch, positions: str) -> Tensor:
    """(B, T) bool: ``answer``, the positions whose next token is an answer token (labels not IGNORE);
    ``all``, every real token (``attention_mask``)."""
    if positions == "all":
        return batch["attention_mask"].bool()
    return F.pad(batch["labels"][:, 1:] != IGNORE, (0, 1), value=False)  # logits at t predict token t + 1


def causal_lm_of(model: nn.Module) -> Any:
    """The decoder (``LlamaForCausalLM``-like: ``.model.layers``, ``.model.norm``, ``.lm_head``) under PEFT."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def exit_logits(lm: Any, input_ids: Tensor, attention_mask: Tensor, k: int) -> Tensor:
    """Logits (B, T, V) of the embedding, blocks 0..k-1, final norm and LM head: what ``full:K`` serves
    (``infer/modules.ModuleHost``), on a right-padded batch, with HF's own causal + padding mask."""
    from transformers.masking_utils import create_causal_mask

    backbone = lm.model
    hidden = backbone.embed_tokens(input_ids)  # (B, T, C)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = create_causal_mask(backbone.config, hidden, attention_mask, None, positions)  # 4th: no cache
    pe = backbone.rotary_emb(hidden, position_ids=positions)
    for layer in list(backbone.layers)[:k]:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=pe)
    logits: Tensor = lm.lm_head(backbone.norm(hidden))
    return logits


def exit_modules(lm: Any, k: int) -> nn.Module:
    """The draft's modules in forward order under the model's own names (``model.layers.i``,
    ``model.norm``, ``lm_head``), for counting its FLOPs; the modules are shared, not copied."""
    inner, outer = nn.Module(), nn.Module()
    inner.layers = nn.ModuleList(list(lm.model.layers)[:k])
    inner.norm = lm.model.norm
    outer.model, outer.lm_head = inner, lm.lm_head
    return outer


def prompt_of(sample: Encoded) -> list[int]:
    """The tokens before a sample's answer (the first label); a plain text's first half."""
    first = next((i for i, lab in enumerate(sample.labels) if lab != IGNORE), len(sample.labels))
    return list(sample.input_ids[: first if first else max(1, len(sample.input_ids) // 2)])


@torch.no_grad()
def teacher_answers(lm: Any, samples: Sequence[Encoded], pad_id: int, eos_id: int | None, max_new_tokens: int,
                    max_length: int, batch_size: int = 16) -> list[Encoded]:
    """Each sample's prompt with the teacher's greedy continuation as its answer (at most ``max_new_tokens``,
    the whole within ``max_length``, ending at EOS): what the target answered, in the order given."""
    from transformers import GenerationConfig

    prompts = [prompt_of(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))  # less padding
    out: list[Encoded | None] = [None] * len(samples)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, P), left-padded
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        new = min(max_new_tokens, max_length - len(prompts[rows[0]]))  # the shortest prompt's room
        gen = lm.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=max(new, 1), do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id))[:, width:]
        for r, i in enumerate(rows):
            answer = gen[r].tolist()[: max(0, min(max_new_tokens, max_length - len(prompts[i])))]
            if eos_id in answer:
                answer = answer[: answer.index(eos_id) + 1]
            out[i] = Encoded(tuple(prompts[i] + answer), (IGNORE,) * len(prompts[i]) + tuple(answer), samples[i].task)
    return [e for e in out if e is not None]


def with_teacher_answers(lm: Any, data: FederatedData, pad_id: int, eos_id: int | None, max_new_tokens: int,
                         max_length: int, eval_per_task: int | None = None, heldout: bool = True) -> FederatedData:
    """``data`` with every answer (clients' training and, when ``heldout``, held-out samples; the global
    evaluation's) the teacher's own; the global evaluation keeps the first ``eval_per_task`` samples per
    task (``eval.max_per_task``: all that evaluation reads)."""
    answer = lambda xs: teacher_answers(lm, xs, pad_id, eos_id, max_new_tokens, max_length)  # noqa: E731
    clients = [dataclasses.replace(c, train=answer(c.train), heldout=answer(c.heldout) if heldout else c.heldout)
               for c in data.clients]
    evals = {t: answer(xs[:eval_per_task] if eval_per_task else xs) for t, xs in data.global_eval.items()}
    return dataclasses.replace(data, clients=clients, global_eval=evals,
                               description=data.description + "; answers: the teacher's greedy continuations")


def merge_teacher(base: nn.Module, folder: str) -> nn.Module:
    """``base`` with the causal-LM adapter in ``folder`` merged into its weights (W0 + BA), in place."""
    merged: nn.Module = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged


def check_teacher(folder: str, model: str) -> None:
    """A ConfigError unless ``folder`` is a PEFT adapter folder whose task card (if any) is a causal LM of ``model``."""
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"draft.teacher_adapter {folder} is not a PEFT adapter folder (no adapter_config.json)")
    card_file = path / CARD
    try:
        card = json.loads(card_file.read_text()) if card_file.is_file() else {"task": "causal_lm", "model": model}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"draft.teacher_adapter: {card_file} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("task") != "causal_lm" or card.get("model") != model:
        raise ConfigError(f"draft.teacher_adapter {folder} holds a card {card!r}; the teacher needs a causal_lm "
                          f"adapter of model '{model}'")


# --- the task ---


class DraftDistill:
    name: ClassVar[str] = "draft_distill"
    generates: ClassVar[bool] = True

    def __init__(self, pad_id: int, exit_layer: int, temperature: float = 1.0, train_norm: bool = True,
                 teacher_adapter: str | None = None, positions: str = "answer") -> None:
        self.text = CausalLM(pad_id)  # samples, collation, requests and answers are the causal LM's
        self.exit_layer, self.temperature, self.train_norm = exit_layer, temperature, train_norm
        self.teacher_adapter, self.positions = teacher_adapter, positions
        self.exit_fm: FlopModel | None = None  # the draft's matmul sizes, read off the wrapped model by ``wrap``

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        d = cfg.draft
        assert d.exit_layer is not None  # config: required for this task
        teacher = str(Path(d.teacher_adapter).resolve()) if d.teacher_adapter else None
        if teacher:
            check_teacher(teacher, cfg.model.name)
        # a copy of its own, not the per-process cached one: a merged teacher changes the base's weights, and
        # PEFT's unload (at a run's end) leaves the trained norm copy in place of the original
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed), fresh=True)
        if teacher:
            base = merge_teacher(base, teacher)
        layers = int(getattr(base, "config").num_hidden_layers)
        if not 1 <= d.exit_layer < layers:
            raise ConfigError(f"draft.exit_layer must be in [1, {layers - 1}] for model '{cfg.model.name}' ({layers} "
                              f"blocks; K = {layers} would be the full model itself), got {d.exit_layer}")
        data = build_federated_data(resolve_auto(cfg.data)[0], tok, cfg.seed)
        if d.data == "teacher":
            data = with_teacher_answers(base, data, int(tok.pad_token_id), tok.eos_token_id, d.max_new_tokens,
                                        cfg.data.max_length, cfg.eval.max_per_task, bool(cfg.eval.client_heldout))
        task = cls(int(tok.pad_token_id), d.exit_layer, d.temperature, d.train_norm, teacher, d.positions)
        return TaskSetup(task, base, tok, data)

    @classmethod
    def load(cls, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]:
        return CausalLM.load(model, dtype, seed, fresh)

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "DraftDistill":
        k = card.get("exit_layer")
        if type(k) is not int or k < 1:
            raise ValueError(f"a draft_distill card needs 'exit_layer' (an integer >= 1), got {k!r}")
        return cls(int(tokenizer.pad_token_id), k, float(card.get("temperature", 1.0)),
                   bool(card.get("train_norm", True)), card.get("teacher_adapter"), str(card.get("positions", "answer")))

    def size(self, sample: Encoded) -> int:
        return self.text.size(sample)

    def collate(self, samples: Sequence[Encoded]) -> Batch:
        return self.text.collate(samples)

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        """LoRA on blocks 0..K-1 only (``layers_to_transform``), the final norm's copy trained in full."""
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                         target_modules=list(lora.target_modules), layers_to_transform=list(range(self.exit_layer)),
                         layers_pattern="layers", modules_to_save=["model.norm"] if self.train_norm else None)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the A matrices depend only on the seed (as models/lora.attach_lora)
            try:
                model = get_peft_model(base, cfg)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"model.lora.target_modules {list(lora.target_modules)} do not match this model "
                                 f"({exc})") from None
        self.exit_fm = module_flop_model(exit_modules(causal_lm_of(model), self.exit_layer), self.exit_layer,
                                         flop_model(model).d_attn)
        return model

    # --- forward passes, loss, metrics ---

    def output(self, model: Any, batch: Batch) -> Tensor:
        """The draft's (the student's) logits (B, T, V)."""
        return exit_logits(causal_lm_of(model), batch["input_ids"], batch["attention_mask"], self.exit_layer)

    @torch.no_grad()
    def teacher(self, model: Any, batch: Batch) -> Tensor:
        """The full model's logits (B, T, V), with the draft's adapter off."""
        lm = causal_lm_of(model)
        layers = len(lm.model.layers)
        if not isinstance(model, PeftModel):
            return exit_logits(lm, batch["input_ids"], batch["attention_mask"], layers)
        with model.disable_adapter():
            return exit_logits(lm, batch["input_ids"], batch["attention_mask"], layers)

    def taught(self, model: Any, batch: Batch) -> Batch:
        """``batch`` with the teacher's logits under ``TEACHER_LOGITS`` (what ``head_loss`` compares to)."""
        return {**batch, TEACHER_LOGITS: self.teacher(model, batch)}

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        return self.head_loss(self.output(model, batch), self.taught(model, batch))

    def eval_sums(self, model: Any, batch: Batch) -> dict[str, float]:
        return self.head_sums(self.output(model, batch), self.taught(model, batch))

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        """Mean over the KL positions of KL(teacher || draft) tau^2; ``batch`` must hold the teacher's logits."""
        total, count = distill_kl(output, _teacher_logits(batch), kl_positions(batch, self.positions), self.temperature)
        return total / max(count, 1)

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Summed KL, KL positions, and positions where the draft's argmax is the teacher's (greedy acceptance)."""
        teacher = _teacher_logits(batch)
        keep = kl_positions(batch, self.positions)
        total, count = distill_kl(output, teacher, keep, self.temperature)
        agree = int((output.argmax(-1) == teacher.argmax(-1))[keep].sum())
        return {"loss_sum": float(total), "count": count, "agree": agree}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("count", 0)
        return {"loss": sums["loss_sum"] / n if n else float("nan"),
                "agreement": sums.get("agree", 0) / n if n else float("nan")}

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """The teacher's forward over every block (adapter off: frozen weights only) plus the draft's
        forward and backward over its K blocks, norm and head. The two softmaxes and the KL add ~10
        FLOPs per vocabulary entry per token against the head's 2 d_model per entry: left out."""
        assert self.exit_fm is not None, "wrap() reads the draft's FLOP model"
        b, t = batch["input_ids"].shape
        teacher = dataclasses.replace(fm, lora_macs=0, full_macs=0, no_grad_macs=0, no_grad_layers=0)
        return forward_flops(teacher, b * t, t) + lora_train_flops(self.exit_fm, b * t, t)

    def tokens(self, batch: Batch) -> int:
        return self.text.tokens(batch)

    # --- serving ---

    def card(self) -> dict[str, Any]:
        return {"exit_layer": self.exit_layer, "temperature": self.temperature, "train_norm": self.train_norm,
                "teacher_adapter": self.teacher_adapter, "positions": self.positions}

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        """The base (with the teacher's adapter merged, if it had one) and the draft adapters; a draft
        is served as ``full:K`` with K = ``exit_layer`` (the infer topology checks this)."""
        if self.teacher_adapter:
            base = merge_teacher(base, self.teacher_adapter)
        return load_adapters(base, dict(adapters)) if adapters else base

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        return self.text.request(tokenizer, inputs, max_length)

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        return self.text.wire_inputs(tensors)

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        return self.text.predict(output)

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        return self.text.answers(predicted, batch, tokenizer)


def _teacher_logits(batch: Batch) -> Tensor:
    teacher = batch.get(TEACHER_LOGITS)
    if teacher is None:
        raise ValueError(f"draft_distill's loss compares to the teacher: the batch needs '{TEACHER_LOGITS}' "
                         f"(DraftDistill.taught adds them)")
    return teacher
