"""Several sensing tasks on one backbone: activity recognition and respiration rate, one head each.

2505.03139's picture of one large model serving many sensing tasks, federated: client k holds
one task's windows (``sensing.tasks[k % len]``, ``sensing.data.build_multitask_data``). Every
client trains and sends the shared part (LoRA on the backbone, the sensor embedding, the norms)
and its own task's head only: ``untrained`` names the other heads, which ``fl.client.local_train``
neither trains nor uploads, and the server averages each head over the clients that sent it
(``fl.aggregate.fill_unsent``), so a head is FedAvg over its task's clients while the backbone is
FedAvg over everyone. With ``sensing.task_embeddings`` (the default) the sensor embedding is per
task too (``embed_<task>``: each sensing modality its own encoder on its devices, the LAM core
shared, 2505.03139's decomposition by modality); off, one embedding is shared by every task.

Tokens are those of ``activity_recognition`` (``tasks/sensing.py``: patch summaries or codebook
codes). The heads read the mean-pooled last hidden state: ``activity`` scores the generated
activities (cross-entropy; accuracy, macro-F1), ``respiration`` regresses the breathing rate,
normalised to [-1, 1] over ``sensing.respiration_bpm`` (squared error; mean absolute and RMS error
in breaths per minute). The model's output is both heads' outputs side by side, (B, C + 1); a
window's loss is its own task's. Evaluation reports each task on its own held-out set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from edgelam.config import RunConfig
from edgelam.models.load import base_seed
from edgelam.sensing.data import SensingSample, build_multitask_data
from edgelam.tasks.base import Batch, TaskSetup
from edgelam.tasks.sensing import ActivityRecognition, SensingPredictor, SensorEmbed, codebook_from_card

__all__ = ["MultiEmbed", "MultiHead", "MultiSensingPredictor", "MultiTaskSensing"]
TASK_ORDER = ("activity", "respiration")


class MultiHead(nn.Module):
    """One linear head per task (``head_<task>``), outputs side by side: activity logits (C), then the
    normalised respiration rate (1)."""

    def __init__(self, d_model: int, tasks: Sequence[str], classes: int) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        for t in self.tasks:
            setattr(self, f"head_{t}", nn.Linear(d_model, classes if t == "activity" else 1))

    def forward(self, pooled: Tensor) -> Tensor:
        return torch.cat([getattr(self, f"head_{t}")(pooled) for t in self.tasks], dim=-1)


class MultiEmbed(nn.Module):
    """One ``SensorEmbed`` per task (``embed_<task>``): each window through its own task's."""

    def __init__(self, tasks: Sequence[str], make: Callable[[], SensorEmbed]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        for t in self.tasks:
            setattr(self, f"embed_{t}", make())

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        parts = {i: getattr(self, f"embed_{t}") for i, t in enumerate(TASK_ORDER) if t in self.tasks}
        out: Tensor | None = None
        for i, embed in parts.items():
            rows = task_ids == i
            if bool(rows.any()):
                got = embed(x[rows])
                out = got.new_zeros((x.shape[0], *got.shape[1:])) if out is None else out
                out[rows] = got
        if out is None:
            raise ValueError(f"no window of a task of this model ({list(self.tasks)})")
        return out


class MultiSensingPredictor(SensingPredictor):
    """Tokens (and each window's task) -> every head's output side by side (B, C + 1). Without task
    ids (serving: the task of a window is not known) each task's embedding reads every window and
    each head answers from its own task's pass."""

    def __init__(self, backbone: nn.Module, embed: nn.Module, head: MultiHead, tasks: Sequence[str],
                 n_classes: int) -> None:
        super().__init__(backbone, embed, head)
        self.tasks, self.n_classes = tuple(tasks), n_classes
        self.per_task = isinstance(embed, MultiEmbed)  # known here: PEFT later wraps the embedding

    def forward(self, inputs: Tensor, task_ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not self.per_task:
            return self.sensor_head(self.pooled(self.sensor_embed(inputs)))  # type: ignore[no-any-return]
        if task_ids is not None:
            return self.sensor_head(self.pooled(self.sensor_embed(inputs, task_ids)))  # type: ignore[no-any-return]
        cols = []
        for t in self.tasks:
            ids = torch.full((inputs.shape[0],), TASK_ORDER.index(t), dtype=torch.long, device=inputs.device)
            out = self.sensor_head(self.pooled(self.sensor_embed(inputs, ids)))
            cols.append(out[:, : self.n_classes] if t == "activity" else out[:, self.n_classes:])
        return torch.cat(cols, dim=-1)


class MultiTaskSensing(ActivityRecognition):
    name: ClassVar[str] = "multitask_sensing"
    generates: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str], classes: Sequence[str], window: int, features: int, patch: int,
                 tokenizer: str, codebook: Tensor | None = None, respiration_bpm: tuple[float, float] = (8.0, 24.0),
                 token_error_rate: float = 0.0, task_embeddings: bool = True) -> None:
        super().__init__(classes, window, features, patch, tokenizer, codebook, token_error_rate)
        unknown = [t for t in tasks if t not in TASK_ORDER]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {list(tasks)} must be distinct names from {list(TASK_ORDER)}")
        self.tasks = tuple(t for t in TASK_ORDER if t in tasks)  # the heads' order in the output
        self.respiration_bpm = (float(respiration_bpm[0]), float(respiration_bpm[1]))
        self.n_classes = len(self.classes) if "activity" in self.tasks else 0
        self.task_embeddings = task_embeddings

    @classmethod
    def setup(cls, cfg: RunConfig) -> TaskSetup:
        data, shape = build_multitask_data(cfg.sensing, cfg.data, cfg.seed)
        base, tok = cls.load(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed))
        s = cfg.sensing
        task = cls(s.tasks, shape.classes, shape.window, shape.features, s.patch, s.tokenizer, shape.codebook,
                   s.respiration_bpm, s.token_error_rate, s.task_embeddings)
        return TaskSetup(task, base, tok, data)

    @classmethod
    def from_card(cls, card: dict[str, Any], tokenizer: Any) -> "MultiTaskSensing":
        try:
            book = codebook_from_card(card) if card.get("tokenizer") == "vq" else None
            lo, hi = card["respiration_bpm"]
            return cls([str(t) for t in card["tasks"]], [str(c) for c in card["classes"]], int(card["window"]),
                       int(card["features"]), int(card["patch"]), str(card["tokenizer"]), book, (float(lo), float(hi)),
                       task_embeddings=bool(card["task_embeddings"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a multitask_sensing card needs tasks, classes, window, features, patch, tokenizer, "
                             f"respiration_bpm, task_embeddings (and the codebook for 'vq') ({exc})") from None

    def predictor(self, backbone: nn.Module, seed: int) -> MultiSensingPredictor:
        d = int(getattr(backbone, "config").hidden_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            embed = MultiEmbed(self.tasks, lambda: self.sensor_embed(d)) if self.task_embeddings else self.sensor_embed(d)
            head = MultiHead(d, self.tasks, len(self.classes))
        return MultiSensingPredictor(backbone, embed, head, self.tasks, self.n_classes)

    def untrained(self, samples: Sequence[SensingSample]) -> tuple[str, ...]:
        """Name fragments of the parameters a client holding ``samples`` neither trains nor sends: the
        heads of the tasks it does not hold."""
        held = {s.task for s in samples}
        kinds = ("head", "embed") if self.task_embeddings else ("head",)
        return tuple(f".{kind}_{t}." for t in self.tasks if t not in held for kind in kinds)

    # --- targets ---

    def _normalise(self, bpm: Tensor) -> Tensor:
        lo, hi = self.respiration_bpm
        return (bpm - (lo + hi) / 2) / max((hi - lo) / 2, 1e-6)

    def _bpm(self, out: Tensor) -> Tensor:
        lo, hi = self.respiration_bpm
        return out * max((hi - lo) / 2, 1e-6) + (lo + hi) / 2

    def collate(self, samples: Sequence[SensingSample]) -> Batch:
        unknown = sorted({s.task for s in samples} - set(self.tasks))
        if unknown:
            raise ValueError(f"samples of tasks {unknown}; this model has heads for {list(self.tasks)}")
        return {"inputs": self.tokenize(torch.stack([s.window for s in samples])),
                "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
                "rates": self._normalise(torch.tensor([s.value for s in samples], dtype=torch.float32)),
                "task_ids": torch.tensor([TASK_ORDER.index(s.task) for s in samples], dtype=torch.long)}

    def output(self, model: Any, batch: Batch) -> Tensor:
        out: Tensor = model(inputs=batch["inputs"], task_ids=batch.get("task_ids"))
        return out

    def _losses(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(per-window loss, activity rows, respiration rows)."""
        out = output.float()
        act, resp = batch["task_ids"] == 0, batch["task_ids"] == 1
        losses = torch.zeros(out.shape[0], device=out.device)
        if bool(act.any()):
            losses = losses.masked_scatter(act, nn.functional.cross_entropy(
                out[act, : self.n_classes], batch["labels"][act], reduction="none"))
        if bool(resp.any()):
            losses = losses.masked_scatter(resp, (out[resp, self.n_classes] - batch["rates"][resp]) ** 2)
        return losses, act, resp

    def head_loss(self, output: Tensor, batch: Batch) -> Tensor:
        return self._losses(output, batch)[0].mean()

    def head_sums(self, output: Tensor, batch: Batch) -> dict[str, float]:
        """Summed loss and windows; activity: windows, right answers, tp_c / fp_c / fn_c; respiration:
        windows, summed absolute and squared rate errors (bpm)."""
        losses, act, resp = self._losses(output, batch)
        out: dict[str, float] = {"loss_sum": float(losses.sum()), "count": int(losses.shape[0])}
        if bool(act.any()):
            logits, labels = output.float()[act, : self.n_classes], batch["labels"][act]
            pred = logits.argmax(dim=-1)
            out |= {"activity_count": int(act.sum()), "correct": int((pred == labels).sum())}
            for c in range(self.n_classes):
                out[f"tp_{c}"] = int(((pred == c) & (labels == c)).sum())
                out[f"fp_{c}"] = int(((pred == c) & (labels != c)).sum())
                out[f"fn_{c}"] = int(((pred != c) & (labels == c)).sum())
        if bool(resp.any()):
            err = self._bpm(output.float()[resp, self.n_classes]) - self._bpm(batch["rates"][resp])
            out |= {"respiration_count": int(resp.sum()), "rate_abs_sum": float(err.abs().sum()),
                    "rate_sq_sum": float((err**2).sum())}
        return out

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """loss; accuracy and macro-F1 over the activity windows; rate MAE and RMSE (bpm) over the
        respiration windows (a task's metrics only where some of its windows were evaluated)."""
        n = sums.get("count", 0)
        out = {"loss": sums["loss_sum"] / n if n else math.nan}
        a = sums.get("activity_count", 0)
        if a:
            act = super().metrics({"loss_sum": 0.0, "count": a, "correct": sums.get("correct", 0),
                                   **{k: v for k, v in sums.items() if k[:3] in ("tp_", "fp_", "fn_")}})
            out |= {"accuracy": act["accuracy"], "macro_f1": act["macro_f1"]}
        r = sums.get("respiration_count", 0)
        if r:
            out |= {"rate_mae_bpm": sums.get("rate_abs_sum", 0.0) / r, "rate_rmse_bpm": math.sqrt(sums.get("rate_sq_sum", 0.0) / r)}
        return out

    # --- serving ---

    def card(self) -> dict[str, Any]:
        return super().card() | {"tasks": list(self.tasks), "respiration_bpm": list(self.respiration_bpm),
                                 "task_embeddings": self.task_embeddings}

    def predict(self, output: Tensor) -> dict[str, Tensor]:
        """activity: every class's probability (B, C) and the most likely (B,); respiration: the rate (B,) bpm."""
        out = output.float()
        got: dict[str, Tensor] = {}
        if self.n_classes:
            probs = torch.softmax(out[:, : self.n_classes], dim=-1)
            got |= {"label": probs.argmax(dim=-1), "scores": probs}
        if "respiration" in self.tasks:
            got["respiration_bpm"] = self._bpm(out[:, self.n_classes])
        return got

    def answers(self, predicted: dict[str, Tensor], batch: Batch, tokenizer: Any) -> list[dict[str, Any]]:
        """Every head's answer for each window (the service does not know which task a window is for)."""
        n = int(batch["inputs"].shape[0])
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        if "label" in predicted:
            rows = [r | a for r, a in zip(rows, super().answers(predicted, batch, tokenizer))]
        if "respiration_bpm" in predicted:
            rows = [r | {"respiration_bpm": round(float(b), 3)} for r, b in zip(rows, predicted["respiration_bpm"].tolist())]
        return rows
