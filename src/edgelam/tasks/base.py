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
from typing import Any, Protocol

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
    examples); ``metrics`` turns added-up sums into the reported numbers (always ``loss``)."""

    def collate(self, samples: Sequence[Any]) -> Batch:
        """A batch of tensors from the task's samples (right-padded to the longest)."""
        ...

    def wrap(self, base: nn.Module, lora: LoraSettings, seed: int) -> PeftModel:
        """Attach LoRA (seeded) and the task's own modules, trainable ones in ``modules_to_save``."""
        ...

    def loss(self, model: PeftModel, batch: Batch) -> Tensor:
        """The scalar training loss of a batch (mean over its ``count`` units)."""
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


@dataclass(frozen=True)
class TaskSetup:
    """What a task's ``setup(cfg)`` gives a federated run: the task, the frozen base model (not
    yet wrapped), its tokenizer and the clients' data (samples of the task's own kind)."""

    task: Task
    base: nn.Module
    tokenizer: Any
    data: FederatedData


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Key-wise ``total + sums`` (a key missing on one side counts as 0)."""
    return {k: total.get(k, 0) + sums.get(k, 0) for k in total.keys() | sums.keys()}


class TaskFactory(Protocol):
    """What ``TASKS`` lists: a task class whose ``setup`` loads the base model and the data for a run."""

    def setup(self, cfg: RunConfig) -> TaskSetup: ...
