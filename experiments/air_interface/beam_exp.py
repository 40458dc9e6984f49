"""Part 2: beam prediction on DeepMIMO New York (3 base stations, 64-beam DFT codebook): the LAM
(federated by base station, and centralised) against kNN and an MLP on the same held-out users;
with track features, the LAM against repeating the last beam."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import Results, Sizes, lam_run

from edgelam.channels.beam_data import BeamSample, build_beam_data
from edgelam.channels.beams import (
    MLPBeam,
    NearestNeighbour,
    RepeatLast,
    gain_loss_db,
    topk_accuracy,
)
from edgelam.config import RunConfig

CONFIG = "tiny_beam.yaml"
KNN_K = 5
METRICS = ("top1", "top3", "gain_loss_db")
POSITION_ROWS = ("kNN (pooled)", "kNN (per BS)", "MLP (pooled)", "MLP (per BS)", "LAM federated", "LAM centralised")
TRACK_ROWS = ("repeat-last beam", "kNN (pooled)", "MLP (pooled)", "LAM federated")


def overrides(sz: Sizes, seed: int, *extra: str) -> list[str]:
    return [f"seed={seed}", f"fl.rounds={sz.beam_rounds}", f"train.local_steps={sz.beam_steps}",
            f"eval.every={sz.beam_rounds}", *extra]


def arrays(samples: list[BeamSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (N, F) float, oracle beams (N,), gains (N, B))."""
    x = torch.stack([s.inputs for s in samples]).float().numpy()
    return x, np.array([s.label for s in samples]), torch.stack([s.gains for s in samples]).double().numpy()


def metrics(scores: np.ndarray, y: np.ndarray, gains: np.ndarray) -> dict[str, float]:
    best = np.argsort(-scores, axis=1, kind="stable")[:, 0]  # ties to the lower beam, as topk_accuracy
    return {"top1": topk_accuracy(scores, y, 1), "top3": topk_accuracy(scores, y, 3),
            "gain_loss_db": gain_loss_db(best, gains)}


def lam_metrics(summary: dict[str, float]) -> dict[str, float]:
    """The run's last evaluation on every base station's held-out users together."""
    return {m: float(summary[f"final_eval_{m}"]) for m in METRICS}


def baselines(cfg: RunConfig, sz: Sizes, seed: int, per_bs: bool = True) -> dict[str, dict[str, float]]:
    """kNN and MLP on the union of the clients' training users (pooled) and one per base station."""
    data, shape = build_beam_data(cfg.beams, cfg.data, cfg.seed)
    train = [s for c in data.clients for s in c.train]
    test = [s for v in data.global_eval.values() for s in v]
    x, y, _ = arrays(train)
    xt, yt, gt = arrays(test)
    knn = NearestNeighbour(shape.n_beams, k=KNN_K).fit(x, y)
    mlp = MLPBeam(shape.n_beams).fit(x, y, epochs=sz.mlp_epochs, seed=seed)
    out = {"kNN (pooled)": metrics(knn.scores(xt), yt, gt), "MLP (pooled)": metrics(mlp.scores(xt), yt, gt)}
    if per_bs:
        out |= per_station(train, test, shape.n_beams, sz, seed)
    return out


def per_station(train: list[BeamSample], test: list[BeamSample], n_beams: int, sz: Sizes,
                seed: int) -> dict[str, dict[str, float]]:
    """One kNN and one MLP per base station, each scoring its own station's held-out users."""
    knn_scores, mlp_scores = [], []
    for bs in dict.fromkeys(s.task for s in test):
        x, y, _ = arrays([s for s in train if s.task == bs])
        xt = arrays([s for s in test if s.task == bs])[0]
        knn_scores.append(NearestNeighbour(n_beams, k=KNN_K).fit(x, y).scores(xt))
        mlp_scores.append(MLPBeam(n_beams).fit(x, y, epochs=sz.mlp_epochs, seed=seed).scores(xt))
    _, yt, gt = arrays(test)
    return {"kNN (per BS)": metrics(np.concatenate(knn_scores), yt, gt),
            "MLP (per BS)": metrics(np.concatenate(mlp_scores), yt, gt)}


def repeat_last(cfg: RunConfig) -> dict[str, float]:
    data, shape = build_beam_data(cfg.beams, cfg.data, cfg.seed)
    xt, yt, gt = arrays([s for v in data.global_eval.values() for s in v])
    return metrics(RepeatLast(shape.n_beams).scores(xt.astype(np.int64)), yt, gt)


def record(res: Results, name: str, row: str, values: dict[str, float]) -> None:
    for m in METRICS:
        res[(name, row, m)].append(values[m])


def run_seed(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    """Position features: LAM federated (3 clients, one BS each), centralised (one client, every BS's
    users, local steps x 3), kNN and MLP. Track features: LAM federated, repeat-last, kNN, MLP."""
    cfg, summary = lam_run(CONFIG, overrides(sz, seed), tmp / "beam_fed")
    record(res, "beam", "LAM federated", lam_metrics(summary))
    central = overrides(sz, seed, "data.num_clients=1", "data.partition=iid", f"train.local_steps={sz.beam_steps * 3}")
    record(res, "beam", "LAM centralised", lam_metrics(lam_run(CONFIG, central, tmp / "beam_central")[1]))
    for row, values in baselines(cfg, sz, seed).items():
        record(res, "beam", row, values)
    tcfg, tsummary = lam_run(CONFIG, overrides(sz, seed, "beams.features=track"), tmp / "beam_track")
    record(res, "track", "LAM federated", lam_metrics(tsummary))
    record(res, "track", "repeat-last beam", repeat_last(tcfg))
    for row, values in baselines(tcfg, sz, seed, per_bs=False).items():
        record(res, "track", row, values)

