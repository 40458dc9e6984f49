"""The ``draft`` config section: task ``draft_distill`` trains a device-side early-exit draft (the
first ``exit_layer`` blocks + final norm + LM head: ``full:K`` in a speculative topology) to agree
with the full model (``tasks/draft.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require


@dataclass(frozen=True)
class DraftConfig:
    # K: the draft is embedding + blocks 0..K-1 + final norm + LM head; LoRA goes on those blocks only
    exit_layer: int | None = None
    # distillation temperature tau: KL(softmax(z_t / tau) || softmax(z_s / tau)) * tau^2 (Hinton et al. 2015)
    temperature: float = 1.0
    # a trainable copy of the final norm for the exit (PEFT modules_to_save); the full model keeps its own
    train_norm: bool = True
    # the teacher: the base model (null), or the base with this causal-LM adapter folder merged in
    teacher_adapter: str | None = None
    # what the draft learns on: text (the clients' own texts) | teacher (each client's prompts with the
    # teacher's greedy answers, as a device logs them while the target serves it: on-policy data)
    data: str = "text"
    # where the KL is taken: answer (positions whose next token is an answer token: where a draft drafts)
    # | all (every real token, prompts too)
    positions: str = "answer"
    max_new_tokens: int = 64  # data teacher: answer tokens per prompt (within data.max_length)

    def __post_init__(self) -> None:
        if self.exit_layer is not None:
            _require(self.exit_layer >= 1, "draft.exit_layer", "must be >= 1 (blocks in the draft)", self.exit_layer)
        _require(0 < self.temperature < math.inf, "draft.temperature", "must be a finite number > 0", self.temperature)
        _one_of(self.data, "draft.data", ["text", "teacher"])
        _one_of(self.positions, "draft.positions", ["answer", "all"])
        _require(self.max_new_tokens >= 1, "draft.max_new_tokens", "must be >= 1", self.max_new_tokens)
        if self.teacher_adapter is not None:
            _require(bool(self.teacher_adapter), "draft.teacher_adapter", "must be a PEFT adapter folder or null",
                     self.teacher_adapter)


def check_draft(draft: DraftConfig, task: str, strategy: str, driver: str, batch_clients: int, dp_mode: str) -> None:
    """What task draft_distill needs, and the draft section only where it applies."""
    if task != "draft_distill":
        _require(draft == DraftConfig(), "draft", f"applies to task draft_distill only (this run's task is {task}); "
                 "remove the section", draft)
        return
    _require(draft.exit_layer is not None, "draft.exit_layer", "is required for task draft_distill (K: the draft "
             "keeps blocks 0..K-1 of the model)", draft.exit_layer)
    _require(driver != "split", "fl.strategy", f"'{strategy}' cuts the model into split-learning segments; task "
             "draft_distill trains a whole early-exit draft on each device. Use a federated scheme", strategy)
    _require(strategy != "flora", "fl.strategy", "flora merges the aggregated update into the frozen base weights, "
             "which are also the teacher's (the full model with adapters off). Use another federated scheme", strategy)
    _require(batch_clients == 1, "runtime.batch_clients", "must be 1 for task draft_distill: the teacher runs with "
             "adapters off, which the mixed-adapter batch does not route", batch_clients)
    _require(dp_mode != "sample", "privacy.dp.mode", "sample (DP-SGD) is not available for task draft_distill: "
             "per-example gradients would need the teacher's logits per example; use client-level DP", dp_mode)
