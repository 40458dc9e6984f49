"""The ``sensing`` config section: Wi-Fi CSI activity recognition with a large model (``data.source:
wifi`` for the real Intel 5300 recordings, ``wifi_sim`` for generated ones; ``task:
activity_recognition``; ``sensing/``, ``tasks/sensing.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require

SIM_CLASSES = ("empty", "walking", "falling", "sitting", "waving")  # sensing/synthetic.py CLASSES
SENSING_TASKS = ("activity", "respiration")  # task multitask_sensing's heads (tasks/sensing_multi.py)


@dataclass(frozen=True)
class SensingConfig:
    # how a window of CSI amplitudes becomes the backbone's input: patch (a linear projection of each
    # patch into the embedding space) or vq (each patch's code in a learned codebook, the codes new
    # vocabulary entries whose embeddings are trained)
    tokenizer: str = "patch"
    codebook: int = 64  # vq: codebook size K (new vocabulary entries)
    patch: int = 10  # frames per patch; a window gives window / patch tokens
    window: int = 100  # frames per window (one sample; about 1 s at the Intel 5300's 100 packets/s)
    window_stride: int = 50  # frames between window starts (real recordings)
    # wifi: recordings are dealt into `folds` folds, stratified by activity; fold `fold` is held out
    # (all windows of a recording stay together). folds = number of recordings: leave-one-recording-out
    folds: int = 4
    fold: int = 0
    # wifi_sim: the generated activities, windows per activity per client, held-out windows per activity
    classes: tuple[str, ...] = SIM_CLASSES
    per_class: int = 20
    eval_per_class: int = 20
    snr_db: float = 25.0
    # task multitask_sensing (data.source wifi_sim): the sensing tasks the clients hold, client k
    # holding tasks[k % len(tasks)] (activity: the generated activities above; respiration: a still
    # person breathing at a rate uniform in respiration_bpm, captured at respiration_hz packets/s)
    tasks: tuple[str, ...] = ("activity", "respiration")
    respiration_bpm: tuple[float, float] = (8.0, 24.0)
    respiration_hz: float = 10.0
    # multitask_sensing: each task its own sensor embedding (the modality's encoder, trained and sent by
    # that task's clients, like its head) or one shared by all tasks
    task_embeddings: bool = True
    # evaluation over a lossy uplink: each token (vq: its code; patch: its whole patch) is lost with
    # this probability (vq: replaced by a random code; patch: zeroed)
    token_error_rate: float = 0.0

    def __post_init__(self) -> None:
        _one_of(self.tokenizer, "sensing.tokenizer", ["patch", "vq"])
        _require(self.codebook >= 2, "sensing.codebook", "must be >= 2 codes", self.codebook)
        _require(self.patch >= 1 and self.window >= self.patch and self.window % self.patch == 0, "sensing.patch",
                 f"must be >= 1 and divide sensing.window ({self.window})", self.patch)
        _require(self.window_stride >= 1, "sensing.window_stride", "must be >= 1", self.window_stride)
        _require(self.folds >= 2 and 0 <= self.fold < self.folds, "sensing.fold",
                 f"must be in [0, sensing.folds) with folds >= 2 (folds {self.folds})", self.fold)
        _require(len(self.classes) >= 2 and set(self.classes) <= set(SIM_CLASSES)
                 and len(set(self.classes)) == len(self.classes), "sensing.classes",
                 f"must list >= 2 distinct generated activities from {list(SIM_CLASSES)}", list(self.classes))
        _require(self.per_class >= 1 and self.eval_per_class >= 1, "sensing.per_class",
                 "per_class and eval_per_class must be >= 1", (self.per_class, self.eval_per_class))
        _require(len(self.tasks) >= 1 and set(self.tasks) <= set(SENSING_TASKS) and len(set(self.tasks)) == len(self.tasks),
                 "sensing.tasks", f"must list distinct sensing tasks from {list(SENSING_TASKS)}", list(self.tasks))
        _require(0 < self.respiration_hz < math.inf, "sensing.respiration_hz", "must be a finite rate > 0 packets per "
                 "second", self.respiration_hz)
        lo, hi = (tuple(self.respiration_bpm) + (0.0, 0.0))[:2]
        _require(len(self.respiration_bpm) == 2 and 0 < lo < hi < 30 * self.respiration_hz,
                 "sensing.respiration_bpm", f"must be [low, high] breaths per minute with 0 < low < high < "
                 f"30 x sensing.respiration_hz ({30 * self.respiration_hz:g}, the Nyquist rate)", list(self.respiration_bpm))
        _require(0.0 <= self.token_error_rate <= 1.0, "sensing.token_error_rate", "must be in [0, 1]",
                 self.token_error_rate)

    @property
    def tokens(self) -> int:
        return self.window // self.patch
