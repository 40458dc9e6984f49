"""Multi-task sensing experiment: activity recognition and respiration rate on one shared backbone
with per-task heads, federated over clients that each hold one task, against each task trained
alone on its own clients, a CNN (activities) and the classical FFT estimator (breathing).

    .venv/bin/python experiments/sensing/multitask.py            # multitask.md and a plot here
    .venv/bin/python experiments/sensing/multitask.py --quick    # a smoke test (/tmp)

Every number in multitask.md is computed by this script from the runs it makes."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
from common import THREADS, bar_plot, git_rev, lam_run, machine, results, table  # noqa: E402

from edgelam.config import RunConfig  # noqa: E402
from edgelam.sensing.baselines import CNNClassifier, breathing_rate_fft, evaluate, fit  # noqa: E402
from edgelam.sensing.data import build_multitask_data  # noqa: E402

CONFIG = "tiny_multitask_sensing.yaml"
LAMS = {"multi-task FL, patch tokens": [], "multi-task FL, codes (K = 64)": ["sensing.tokenizer=vq"],
        "multi-task FL, one sensor embedding for both tasks": ["sensing.task_embeddings=false"],
        "activity alone (its 2 clients)": ["sensing.tasks=[activity]", "data.num_clients=2"],
        "respiration alone (its 2 clients)": ["sensing.tasks=[respiration]", "data.num_clients=2"]}
CNN, FFT, MIDDLE = ("CNN on raw CSI (activity clients' windows, central)", "FFT peak (no training)",
                    "the middle of the range (no training)")
ROWS = (*LAMS, CNN, FFT, MIDDLE)
COLS = ("accuracy", "macro_f1", "rate_mae_bpm", "rate_rmse_bpm")


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]
    per_class: int
    eval_per_class: int
    rounds: int
    local_steps: int
    epochs: int


FULL = Sizes(seeds=(0, 1, 2), per_class=32, eval_per_class=40, rounds=15, local_steps=20, epochs=30)
QUICK = Sizes(seeds=(0,), per_class=4, eval_per_class=4, rounds=1, local_steps=2, epochs=1)


def overrides(sz: Sizes, seed: int, *extra: str) -> list[str]:
    return [f"seed={seed}", "threads=2", f"sensing.per_class={sz.per_class}", f"sensing.eval_per_class={sz.eval_per_class}",
            f"fl.rounds={sz.rounds}", f"train.local_steps={sz.local_steps}", f"eval.every={sz.rounds}", *extra]


def baselines(cfg: RunConfig, sz: Sizes, seed: int, res: dict) -> None:
    data, shape = build_multitask_data(cfg.sensing, cfg.data, cfg.seed)
    act = [s for c in data.clients for s in c.train if s.task == "activity"]
    x, y = torch.stack([s.window for s in act]), torch.tensor([s.label for s in act])
    held = data.global_eval["activity"]
    hx, hy = torch.stack([s.window for s in held]), torch.tensor([s.label for s in held])
    torch.manual_seed(seed)
    cnn = CNNClassifier(shape.features, len(shape.classes))
    fit(cnn, x, y, epochs=sz.epochs, batch_size=16, lr=3e-3, seed=seed)
    m = evaluate(cnn, hx, hy, shape.classes)
    res[("main", CNN, "accuracy")].append(m["accuracy"])
    res[("main", CNN, "macro_f1")].append(m["macro_f1"])
    resp = data.global_eval["respiration"]
    truth = np.array([s.value for s in resp])
    lo, hi = cfg.sensing.respiration_bpm
    for name, est in ((FFT, breathing_rate_fft(torch.stack([s.window for s in resp]).numpy(),
                                                   cfg.sensing.respiration_hz, (lo, hi))),
                      (MIDDLE, np.full(len(truth), (lo + hi) / 2))):
        res[("main", name, "rate_mae_bpm")].append(float(np.abs(est - truth).mean()))
        res[("main", name, "rate_rmse_bpm")].append(float(np.sqrt(((est - truth) ** 2).mean())))


def lam_rows(sz: Sizes, seed: int, tmp: Path, res: dict) -> RunConfig:
    cfg = None
    for i, (name, extra) in enumerate(LAMS.items()):
        c, summary = lam_run(CONFIG, overrides(sz, seed, *extra), tmp / f"run{i}")
        cfg = cfg or c
        for metrics in summary["final_eval_tasks"].values():
            for col in COLS:
                if col in metrics:
                    res[("main", name, col)].append(metrics[col])
        if i == 0:  # what each kind of client sends per round (one head fewer than the whole adapter)
            last = json.loads((tmp / f"run{i}" / "metrics.jsonl").read_text().splitlines()[-1])
            for st in last["client_stats"]:
                kind = c.sensing.tasks[st["client"] % len(c.sensing.tasks)]
                res[("bytes", kind, "up")].append(st["bytes_up"])
    assert cfg is not None
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, written to /tmp (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    sz = QUICK if args.quick else FULL
    out = Path(tempfile.gettempdir()) / "sensing_multitask_quick" if args.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    t0, res = time.perf_counter(), results()
    cfg = None
    for seed in sz.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = lam_rows(sz, seed, Path(tmp), res)
            baselines(cfg, sz, seed, res)
        print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
    assert cfg is not None
    s = cfg.sensing
    bar_plot(res, "main", [r for r in ROWS if res.get(("main", r, "rate_mae_bpm"))], "rate_mae_bpm",
             "breathing rate MAE (bpm)", out / "multitask_respiration.png")
    cmd = shlex.join([".venv/bin/python", "experiments/sensing/multitask.py", *sys.argv[1:]])
    up = {k: int(np.mean(res[("bytes", k, "up")])) for k in s.tasks if res.get(("bytes", k, "up"))}
    lines = [
        "# Sensing: two tasks on one backbone (activity and breathing rate)", "",
        f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `{cmd}` (from the repository root, git {git_rev()})",
        f"- Wall time: {(time.perf_counter() - t0) / 60:.1f} min", f"- Seeds: {list(sz.seeds)} (mean ± std over seeds)", "",
        (f"`configs/{CONFIG}`: 4 clients of generated Wi-Fi CSI; clients 0 and 2 hold activity windows ({sz.per_class} "
         f"per activity each: {', '.join(s.classes)}; 100 frames at 100 packets/s), clients 1 and 3 as many windows "
         f"of a still person breathing at {s.respiration_bpm[0]:g}-{s.respiration_bpm[1]:g} breaths per minute (100 "
         f"frames at {s.respiration_hz:g} packets/s: 10 s). Held out: {sz.eval_per_class} windows per activity, "
         f"{sz.eval_per_class * len(s.classes)} breathing windows. The tiny backbone, FedAvg, {sz.rounds} rounds x "
         f"{sz.local_steps} local steps; LoRA and the norms shared by all four clients, each task's sensor embedding "
         "and head trained and sent only by the clients holding the task and averaged over them ('one sensor "
         "embedding': the embedding shared by all four too). 'Alone': the same set-up with one task and its two "
         "clients. CNN: trained centrally on the activity clients' raw windows "
         f"({sz.epochs} epochs). FFT: the strongest spectral peak of each window's first principal component in the "
         "breathing band."), "",
        *table(res, "main", ROWS, COLS, ["model", "activity accuracy", "activity macro-F1", "breathing MAE (bpm)",
                                         "breathing RMSE (bpm)"], 3), "",
        "![breathing rate error](multitask_respiration.png)", "",
        ("Uplink per client per round (multi-task, patch tokens): "
         + ", ".join(f"{k} client {v:,} bytes" for k, v in up.items())
         + " (each sends the shared part and its own task's embedding and head)."), ""]
    (out / "multitask.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'multitask.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
