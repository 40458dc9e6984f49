"""Part 1: channel prediction (CDL, TDD) on the tiny backbone: the LAM predictor federated,
local-only and centralised against repeat-last, AR(4), GRU, LSTM and a transformer, on the same
held-out users; vs SNR, vs UE speed, zero-shot (train A-C, test D-E) and few-shot (10 % data)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from common import Results, Sizes, lam_run
from torch import Tensor

from edgelam.channels.data import build_channel_data, eval_sets
from edgelam.channels.predictors import (
    GRUPredictor,
    LSTMPredictor,
    TransformerPredictor,
    ar_predict,
    fit,
    nmse_db,
    repeat_last,
)
from edgelam.config import RunConfig
from edgelam.infer.modules import ModuleHost, ModuleSpec

CONFIG = "tiny_channel.yaml"
PROFILES = ("A", "B", "C", "D", "E")
SNRS_DB = (5, 10, 15, 20, 25)
SNR_MAIN_DB = 20  # the SNR of the speed, zero-shot, few-shot and per-profile tables
SPEED_KMH = (10, 120)
SPEED_BINS = ((10, 40), (40, 80), (80, 120))
HIGH_SPEED = "80-120"
Predict = Callable[[str, Tensor], Tensor]  # (environment 'CDL-X', past (N, P, 2S)) -> future (N, F, 2S)
Held = dict[str, tuple[Tensor, Tensor, Tensor]]  # environment -> (past, future, speed_kmh (N,))
BASELINES = ("repeat-last", "AR(4)", "GRU", "LSTM", "Transformer")
LAMS = ("LAM federated", "LAM local-only", "LAM centralised")


def overrides(sz: Sizes, seed: int, *extra: str) -> list[str]:
    """The federated setting: one CDL profile per client (5 clients, by_task), 10-120 km/h."""
    return [f"seed={seed}", "threads=2", f"channels.profiles=[{','.join(PROFILES)}]", f"data.num_clients={len(PROFILES)}",
            f"channels.speed_kmh=[{SPEED_KMH[0]},{SPEED_KMH[1]}]", f"channels.users_per_client={sz.users}",
            f"channels.eval_users={sz.eval_users}", f"fl.rounds={sz.rounds}", f"train.local_steps={sz.local_steps}",
            f"eval.every={sz.rounds}", *extra]


def held_out(cfg: RunConfig, snr_db: float) -> Held:
    """The held-out users of every profile with eval noise at ``snr_db`` (the same users at every SNR)."""
    sets = eval_sets(dataclasses.replace(cfg.channels, eval_snr_db=float(snr_db)), cfg.seed)
    return {k: (torch.stack([s.past for s in v]), torch.stack([s.future for s in v]),
                torch.tensor([s.speed_kmh for s in v])) for k, v in sets.items()}


def lam_predictor(run_dir: Path) -> Predict:
    """A trained run's adapter, served as EdgeLAM serves it."""
    host = ModuleHost(None, ModuleSpec("full"), {"p": str(run_dir / "adapter")})

    def predict(env: str, past: Tensor) -> Tensor:
        with torch.no_grad(), host.served.use("p"):
            return host.task.output(host.served.model, {"past": past}).float()
    return predict


def per_environment(models: dict[str, Predict]) -> Predict:
    """Local-only: each environment's held-out users go to the model trained there."""
    return lambda env, past: models[env](env, past)


def fixed_baselines(future: int) -> dict[str, Predict]:
    return {"repeat-last": lambda env, past: repeat_last(past, future),
            "AR(4)": lambda env, past: ar_predict(past, future, order=4)}


def trained_baselines(cfg: RunConfig, sz: Sizes, seed: int) -> dict[str, Predict]:
    """GRU, LSTM and transformer fitted centrally on the union of the clients' training samples."""
    data, shape = build_channel_data(cfg.channels, cfg.data, cfg.seed)
    train = [s for c in data.clients for s in c.train]
    past, future = torch.stack([s.past for s in train]), torch.stack([s.future for s in train])
    makers = {"GRU": lambda: GRUPredictor(shape.features_in, shape.features_out, shape.future),
              "LSTM": lambda: LSTMPredictor(shape.features_in, shape.features_out, shape.future),
              "Transformer": lambda: TransformerPredictor(shape.features_in, shape.features_out, shape.past, shape.future)}
    out: dict[str, Predict] = {}
    for name, make in makers.items():
        torch.manual_seed(seed)
        model = make()
        fit(model, past, future, epochs=sz.epochs, seed=seed)
        out[name] = _no_grad(model)
    return out


def _no_grad(model: torch.nn.Module) -> Predict:
    def predict(env: str, past: Tensor) -> Tensor:
        with torch.no_grad():
            return model(past)
    return predict


def predict_set(fn: Predict, held: Held, envs: list[str] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(prediction, target, speed) over ``envs`` (default: all) of the held-out set, concatenated."""
    keys = envs or list(held)
    preds = [fn(k, held[k][0]) for k in keys]
    return torch.cat(preds), torch.cat([held[k][1] for k in keys]), torch.cat([held[k][2] for k in keys])


def speed_nmse(pred: Tensor, target: Tensor, speed: Tensor) -> dict[str, float]:
    out = {}
    for lo, hi in SPEED_BINS:
        m = (speed >= lo) & (speed <= hi) if hi == SPEED_BINS[-1][1] else (speed >= lo) & (speed < hi)
        if bool(m.any()):
            out[f"{lo}-{hi}"] = nmse_db(pred[m], target[m])
    return out


# --- one seed ---


def train_lams(sz: Sizes, seed: int, tmp: Path) -> tuple[RunConfig, dict[str, Predict]]:
    """LAM federated (5 clients, one profile each), local-only (one run per profile, same steps per
    client) and centralised (every user on one client; local steps x 5, the federation's total)."""
    cfg, _ = lam_run(CONFIG, overrides(sz, seed), tmp / "fed")
    local = {}
    for p in PROFILES:
        lam_run(CONFIG, overrides(sz, seed, "data.num_clients=1", f"channels.profiles=[{p}]"), tmp / f"local_{p}")
        local[f"CDL-{p}"] = lam_predictor(tmp / f"local_{p}")
    central = overrides(sz, seed, "data.num_clients=1", "data.partition=iid",
                        f"channels.users_per_client={sz.users * len(PROFILES)}",
                        f"train.local_steps={sz.local_steps * len(PROFILES)}")
    lam_run(CONFIG, central, tmp / "central")
    return cfg, {"LAM federated": lam_predictor(tmp / "fed"), "LAM local-only": per_environment(local),
                 "LAM centralised": lam_predictor(tmp / "central")}


def score_main(predictors: dict[str, Predict], cfg: RunConfig, res: Results) -> None:
    """NMSE vs SNR, vs speed (at SNR_MAIN_DB) and per environment (at SNR_MAIN_DB)."""
    for snr in SNRS_DB:
        held = held_out(cfg, snr)
        for name, fn in predictors.items():
            pred, target, speed = predict_set(fn, held)
            res[("snr", name, str(snr))].append(nmse_db(pred, target))
            if snr != SNR_MAIN_DB:
                continue
            for bucket, v in speed_nmse(pred, target, speed).items():
                res[("speed", name, bucket)].append(v)
            for env in held:
                p, t, _ = predict_set(fn, held, [env])
                res[("env", name, env)].append(nmse_db(p, t))


def score_transfer(sz: Sizes, seed: int, tmp: Path, cfg: RunConfig, main: dict[str, Predict], res: Results) -> None:
    """Zero-shot (train A-C, test D-E) and few-shot (10 % of each client's samples), at SNR_MAIN_DB,
    on the same held-out users as the main table."""
    held = held_out(cfg, SNR_MAIN_DB)
    unseen = ["CDL-D", "CDL-E"]
    zs_over = overrides(sz, seed, "data.num_clients=3", "channels.profiles=[A,B,C]", "channels.eval_profiles=[D,E]")
    zs_cfg, _ = lam_run(CONFIG, zs_over, tmp / "zeroshot")
    fs_cfg, _ = lam_run(CONFIG, overrides(sz, seed, "channels.few_shot=0.1"), tmp / "fewshot")
    zero = {**fixed_baselines(cfg.channels.future), **trained_baselines(zs_cfg, sz, seed),
            "LAM federated": lam_predictor(tmp / "zeroshot")}
    few = {**fixed_baselines(cfg.channels.future), **trained_baselines(fs_cfg, sz, seed),
           "LAM federated": lam_predictor(tmp / "fewshot")}
    for name, fn in zero.items():
        res[("transfer", name, "zero-shot D,E")].append(nmse_db(*predict_set(fn, held, unseen)[:2]))
    for name, fn in main.items():
        res[("transfer", name, "trained on all, D,E")].append(nmse_db(*predict_set(fn, held, unseen)[:2]))
        res[("transfer", name, "full data, all")].append(nmse_db(*predict_set(fn, held)[:2]))
    for name, fn in few.items():
        res[("transfer", name, "few-shot 10 %, all")].append(nmse_db(*predict_set(fn, held)[:2]))


def run_seed(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    cfg, lams = train_lams(sz, seed, tmp)
    predictors = {**fixed_baselines(cfg.channels.future), **trained_baselines(cfg, sz, seed), **lams}
    score_main(predictors, cfg, res)
    score_transfer(sz, seed, tmp, cfg, {k: predictors[k] for k in (*BASELINES, "LAM federated")}, res)
