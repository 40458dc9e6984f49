"""The Task seam: what a sample is, how a batch is collated, how a base model is wrapped (input
module, LoRA, head), the loss, the metrics and the work (FLOPs) of a batch.

Federated training (``fl/client.local_train``) and evaluation (``fl/evaluate``, ``fl/context``)
see a task only through this Protocol, so a new task is one file in ``tasks/`` plus its name in
``TASKS`` and in ``config.TASK_NAMES``. Trainable modules besides LoRA (a classification head)
are put in PEFT's ``modules_to_save`` by ``wrap``: they are then in the adapter state dict, so they
travel, are counted in bytes and are saved with the adapter like the LoRA factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from peft import PeftModel
from torch import Tensor, nn

from edgelam.config import LoraConfig as LoraSettings
from edgelam.config import RunConfig
from edgelam.data.build import FederatedData
from edgelam.models.flops import FlopModel

Batch = dict[str, Tensor]


class Task(Protocol):
    """One learning task. ``eval_sums`` returns sums over a batch that add up over batches and
    always holds ``loss_sum`` and ``count`` (the units the loss is averaged over: target tokens,
    examples); ``metrics`` turns added-up sums into the reported numbers (always ``loss``).

    Serving (``infer/``) goes through the last five verbs: ``card`` is written beside each saved
    adapter, ``serve_model`` rebuilds the trained model from adapter folders, ``request`` encodes
    raw inputs, ``predict`` turns the model's output into the tensors a service sends and
    ``answers`` into JSON. ``generates``: a decoder that generates token by token, served as
    modules with KV-cache sessions (embed, blocks, head); any other task is served whole."""

    name: ClassVar[str]
    generates: ClassVar[bool]

    def collate(self, samples: Sequence[Any]) -> Batch:
        """A batch of tensors from the task's samples (right-padded to the longest)."""
        ...

    def size(self, sample: Any) -> int:
        """Tokens (positions) one sample takes in the model: batches are sorted by it, probes priced."""
        ...

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        """Attach LoRA (seeded) and the task's own modules, trainable ones in ``modules_to_save``."""
        ...

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        """The scalar training loss of a batch (mean over its ``count`` units)."""
        ...

    def output(self, model: Any, batch: Batch) -> Tensor:
        """The model's output (logits) for a batch: what ``head_sums`` and ``predict`` read."""
        ...

    def eval_sums(self, model: PeftModel, batch: Batch) -> dict[str, float]:
        ...

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        """The training loss from the model's output (logits): what a split model's last segment,
        which runs the head on the device, computes."""
        ...

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """``eval_sums`` from the model's output (logits)."""
        ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        ...

    def work_flops(self, fm: FlopModel, batch: Batch) -> float:
        """Forward + backward FLOPs of one training pass over ``batch``."""
        ...

    def tokens(self, batch: Batch) -> int:
        """Tokens the hardware computed for ``batch`` (padded)."""
        ...

    def card(self) -> dict[str, Any]:
        """What serving needs besides the adapter to rebuild this task (JSON values: class names...)."""
        ...

    def serve_model(self, base: nn.Module, adapters: dict[str, Path]) -> nn.Module:
        """The trained model to serve: ``base`` wrapped as ``wrap`` does, each adapter folder loaded
        under its name (a ``PeftModel``; ``set_adapter`` picks one); ``base`` itself when none."""
        ...

    def request(self, tokenizer: Any, inputs: list[Any], max_length: int) -> Batch:
        """A batch from raw JSON inputs (texts; a channel predictor's CSI arrays), encoded as the
        task's data are (text truncated to ``max_length`` tokens); ``ValueError`` naming a bad input."""
        ...

    def wire_inputs(self, tensors: dict[str, Tensor]) -> Batch:
        """The model's input batch from a /v1/forward message; ``ValueError`` naming what is wrong."""
        ...

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """The tensors a service returns, from the model's output (logits)."""
        ...

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        """One JSON answer per input of ``batch`` from what ``predict`` returned."""
        ...


@dataclass(frozen=True)
class TaskSetup:
    """What a task's ``setup(cfg)`` gives a federated run: the task, the frozen base model (not
    yet wrapped), its tokenizer and the clients' data (samples of the task's own kind)."""

    task: Task
    base: nn.Module
    tokenizer: Any
    data: FederatedData


def texts(inputs: list[Any]) -> list[str]:
    """``inputs`` when every one is a non-empty string (the text tasks' requests)."""
    if not all(isinstance(x, str) and x for x in inputs):
        raise ValueError("every input must be a non-empty string")
    return list(inputs)


def token_inputs(tensors: dict[str, Tensor]) -> Batch:
    """``input_ids`` (B, T) int and ``attention_mask`` (0 / 1, no empty row; all ones when absent)."""
    import torch

    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
        raise ValueError("expected an int32 / int64 tensor 'input_ids' of shape (batch, tokens)")
    mask = tensors.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape or mask.dtype not in (torch.int32, torch.int64) or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"'attention_mask' must be 0 / 1 integers of the shape of input_ids {tuple(ids.shape)}")
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("'attention_mask' has a row with no tokens")
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Key-wise ``total + sums`` (a key missing on one side counts as 0)."""
    return {k: total.get(k, 0) + sums.get(k, 0) for k in total.keys() | sums.keys()}


class TaskFactory(Protocol):
    """What ``TASKS`` lists: a task class whose ``setup`` loads the base model and the data for a
    run, ``load`` the base model alone and ``from_card`` rebuilds the task from its card (serving)."""

    def setup(self, cfg: RunConfig) -> TaskSetup: ...

    def load(self, model: str, dtype: str, seed: int, fresh: bool = True) -> tuple[nn.Module, Any]: ...

    def from_card(self, card: dict[str, Any], tokenizer: Any) -> Task: ...
