"""Federated activity-recognition data: CSI amplitude windows per client, a held-out set, and the
codebook of the ``vq`` tokenizer.

``data.source: wifi``: the real Intel 5300 activity recordings (``sensing/wifi.py``). Each
recording is cut into windows of ``sensing.window`` frames every ``window_stride``; the recordings
are dealt into ``sensing.folds`` folds, stratified by activity (shuffled by seed within each
activity), and fold ``sensing.fold`` is held out whole, so no window of a held-out recording (nor
one overlapping it) is trained on; ``folds`` = the number of recordings is leave-one-recording-out.
The training recordings go to clients ``by_task`` (client k holds recordings k, k + n, ...: a
device is a place and time), ``iid`` (windows shared out evenly) or ``dirichlet`` (label skew).

``data.source: wifi_sim``: generated windows (``sensing/synthetic.py``): each client draws its own
``per_class`` windows of every activity in ``sensing.classes`` from the room model, the held-out
set ``eval_per_class`` more; ``iid`` only.

Every window's amplitudes are taken relative to their own mean over the window, per feature
(``relative``: a / mean(a) - 1): that removes the link's gain and each subcarrier's level, so real
and generated windows look alike to the model, and keeps how much each one moves, which is what
tells a still room from a moving person (a z-score would scale a still room's noise up to the size
of a walk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from edgelam.config import DataConfig
from edgelam.config_sensing import SENSING_TASKS, SensingConfig
from edgelam.data.build import ClientData, FederatedData
from edgelam.data.partition import dirichlet, iid
from edgelam.data.sources import DataError
from edgelam.sensing import synthetic, wifi
from edgelam.sensing.tokens import descriptors, federated_codebook, patches
from edgelam.store import Purpose, rng_for

HELD_OUT = "held-out"


@dataclass(frozen=True)
class SensingSample:
    window: Tensor  # (W, F) float32 amplitudes relative to their mean over the window (``relative``)
    label: int  # index into the task's classes (0 for a respiration window)
    task: str  # where it came from: a recording's file name, "sim"; multitask_sensing: its task
    value: float = 0.0  # a respiration window's breathing rate, breaths per minute


@dataclass(frozen=True)
class SensingShape:
    classes: tuple[str, ...]
    window: int
    features: int
    n_rx: int
    n_tx: int
    codebook: Tensor | None  # (K, 2F) for the vq tokenizer, else None


def relative(w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(..., W, F) amplitudes -> a / mean(a) - 1 per feature over the window's frames, float32 (a
    feature whose mean is below ``eps``, a dead subcarrier, becomes 0)."""
    w = np.asarray(w, dtype=np.float64)
    mean = w.mean(axis=-2, keepdims=True)
    return np.where(mean < eps, 0.0, w / np.maximum(mean, eps) - 1.0).astype(np.float32)


def _samples(w: np.ndarray, label: int, task: str) -> list[SensingSample]:
    x = torch.from_numpy(relative(w))
    return [SensingSample(x[i], label, task) for i in range(len(x))]


def stratified_folds(labels: list[str], folds: int, rng: np.random.Generator) -> list[int]:
    """Each recording's fold: every activity's recordings shuffled, then dealt round-robin, the deal
    continuing from activity to activity so the folds stay even in size."""
    fold = [0] * len(labels)
    turn = 0
    for label in sorted(set(labels)):
        for i in rng.permutation([j for j, lab in enumerate(labels) if lab == label]):
            fold[int(i)] = turn % folds
            turn += 1
    return fold


def _real(s: SensingConfig, num_clients: int, partition: str, alpha: float, seed: int
          ) -> tuple[list[list[SensingSample]], list[SensingSample], tuple[str, ...], tuple[int, int], str]:
    recs = wifi.activity_recordings()
    if s.folds > len(recs):
        raise DataError(f"sensing.folds {s.folds} exceeds the {len(recs)} recordings; at most {len(recs)} "
                        f"(leave-one-recording-out)")
    classes = tuple(sorted({str(r.label) for r in recs}))
    fold = stratified_folds([str(r.label) for r in recs], s.folds, rng_for(seed, Purpose.SENSING_FOLDS))
    per_rec = [_samples(wifi.windows(wifi.amplitude_features(r), s.window, s.window_stride),
                        classes.index(str(r.label)), r.path.name) for r in recs]
    shapes = {(r.n_rx, r.n_tx) for r in recs}
    if len(shapes) != 1:
        raise DataError(f"the activity recordings mix antenna configurations {sorted(shapes)}; one is needed")
    test = [x for i, xs in enumerate(per_rec) if fold[i] == s.fold for x in xs]
    train_recs = [i for i in range(len(recs)) if fold[i] != s.fold and per_rec[i]]
    if not test:
        raise DataError(f"held-out fold {s.fold} has no window of {s.window} frames; lower sensing.window")
    rng = rng_for(seed, Purpose.SENSING_PARTITION)
    if partition == "by_task":
        if len(train_recs) < num_clients:
            raise DataError(f"{len(train_recs)} training recordings cannot give {num_clients} clients one each; "
                            f"lower data.num_clients or use data.partition iid")
        order = [train_recs[int(i)] for i in rng.permutation(len(train_recs))]
        clients = [[x for i in order[k::num_clients] for x in per_rec[i]] for k in range(num_clients)]
    else:
        pool = [x for i in train_recs for x in per_rec[i]]
        parts = dirichlet([str(x.label) for x in pool], num_clients, alpha, rng) if partition == "dirichlet" \
            else iid(len(pool), num_clients, rng)
        clients = [[pool[i] for i in p] for p in parts]
    unseen = sorted({classes[x.label] for x in test} - {classes[x.label] for xs in clients for x in xs})
    note = f"; held-out activities never trained on: {unseen}" if unseen else ""
    desc = (f"Wi-Fi CSI (Intel 5300, {len(recs)} recordings, {len(classes)} activities): fold {s.fold} of {s.folds} "
            f"held out ({sum(f == s.fold for f in fold)} recordings, {len(test)} windows){note}")
    return clients, test, classes, next(iter(shapes)), desc


def _relative_amplitudes(h: np.ndarray, window: int) -> Tensor:
    """Generated CSI (N, W, subcarriers, rx, tx) -> relative amplitude windows (N, W, F)."""
    return torch.from_numpy(relative(np.abs(h).reshape(len(h), window, -1)))


def _activities(room: synthetic.RoomConfig, s: SensingConfig, per_class: int, rng: np.random.Generator,
                task: str) -> list[SensingSample]:
    h, y = synthetic.generate_set(room, per_class, rng, s.classes)
    x = _relative_amplitudes(h, s.window)
    return [SensingSample(x[i], int(y[i]), task) for i in range(len(x))]


def _generated(s: SensingConfig, num_clients: int, seed: int
               ) -> tuple[list[list[SensingSample]], list[SensingSample], tuple[str, ...], tuple[int, int], str]:
    room = synthetic.RoomConfig(frames=s.window, snr_db=s.snr_db)

    def draw(n: int, stream: int) -> list[SensingSample]:
        return _activities(room, s, n, rng_for(seed, Purpose.SENSING_SIM, stream), "sim")

    clients = [draw(s.per_class, k) for k in range(num_clients)]
    test = draw(s.eval_per_class, 10_000)
    desc = (f"generated Wi-Fi CSI ({room.carrier_ghz} GHz, {room.n_rx}x{room.n_tx} antennas, SNR {s.snr_db:g} dB): "
            f"{len(s.classes)} activities x {s.per_class} windows per client, {len(test)} held out")
    return clients, test, tuple(s.classes), (room.n_rx, room.n_tx), desc


def _codebook(s: SensingConfig, clients: list[list[SensingSample]], features: int, seed: int) -> Tensor:
    vecs = [descriptors(patches(torch.stack([x.window for x in c]), s.patch)).reshape(-1, 2 * features).numpy()
            for c in clients]
    return federated_codebook(vecs, s.codebook, int(rng_for(seed, Purpose.SENSING_CODEBOOK).integers(2**31)))


def build_multitask_data(s: SensingConfig, data: DataConfig, seed: int) -> tuple[FederatedData, SensingShape]:
    """Generated windows of several sensing tasks (task ``multitask_sensing``): client k holds task
    ``s.tasks[k % len]`` only; ``activity``: ``per_class`` windows of each generated activity;
    ``respiration``: as many windows of a still person breathing at a rate uniform in
    ``respiration_bpm``, captured at ``respiration_hz`` packets/s (the window spans ``window /
    respiration_hz`` s). One held-out set per task; the ``vq`` codebook is learned over every task."""
    room = synthetic.RoomConfig(frames=s.window, snr_db=s.snr_db)
    slow = synthetic.RoomConfig(frames=s.window, snr_db=s.snr_db, packet_rate_hz=s.respiration_hz)

    def draw(task: str, per_class: int, stream: int) -> list[SensingSample]:
        rng = rng_for(seed, Purpose.SENSING_SIM, stream)
        if task == "activity":
            return _activities(room, s, per_class, rng, task)
        h, bpm = synthetic.generate_breathing_set(slow, per_class * len(s.classes), rng, s.respiration_bpm)
        x = _relative_amplitudes(h, s.window)
        return [SensingSample(x[i], 0, task, float(bpm[i])) for i in range(len(x))]

    held = data.num_clients  # >= len(s.tasks): config.RunConfig checks it
    clients = [draw(s.tasks[k % len(s.tasks)], s.per_class, k) for k in range(held)]
    test = {t: draw(t, s.eval_per_class, 10_000 + SENSING_TASKS.index(t)) for t in s.tasks}  # the same with any task list
    features_n = int(clients[0][0].window.shape[1])
    book = _codebook(s, clients, features_n, seed) if s.tokenizer == "vq" else None
    who = "; ".join(f"{t}: clients {[k for k in range(held) if s.tasks[k % len(s.tasks)] == t]}" for t in s.tasks)
    desc = (f"generated Wi-Fi CSI ({room.carrier_ghz} GHz, {room.n_rx}x{room.n_tx} antennas, SNR {s.snr_db:g} dB), "
            f"{len(s.tasks)} sensing tasks ({who}); activity {room.packet_rate_hz:g} packets/s, respiration "
            f"{s.respiration_hz:g} packets/s at {s.respiration_bpm[0]:g}-{s.respiration_bpm[1]:g} bpm"
            + ("; vq codebook learned federatedly over every task" if book is not None else ""))
    fed = FederatedData([ClientData(k, c, []) for k, c in enumerate(clients)], test, {}, desc)
    return fed, SensingShape(tuple(s.classes), s.window, features_n, room.n_rx, room.n_tx, book)


def build_sensing_data(s: SensingConfig, data: DataConfig, seed: int) -> tuple[FederatedData, SensingShape]:
    """The clients' windows, the held-out set and (``vq``) the federated codebook."""
    num_clients, partition = data.num_clients, data.partition
    if data.source == "wifi":
        clients, test, classes, (n_rx, n_tx), desc = _real(s, num_clients, partition, data.dirichlet_alpha, seed)
    else:
        clients, test, classes, (n_rx, n_tx), desc = _generated(s, num_clients, seed)
    empty = [k for k, c in enumerate(clients) if not c]
    if empty:
        raise DataError(f"clients {empty} hold no window; lower data.num_clients or sensing.window")
    features = int(test[0].window.shape[1])
    book = None
    if s.tokenizer == "vq":
        book = _codebook(s, clients, features, seed)
        desc += f"; vq codebook of {s.codebook} codes learned federatedly"
    fed = FederatedData([ClientData(k, c, []) for k, c in enumerate(clients)], {HELD_OUT: test}, {}, desc)
    return fed, SensingShape(classes, s.window, features, n_rx, n_tx, book)
