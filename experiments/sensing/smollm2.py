"""Sensing with SmolLM2-135M: activity recognition from generated Wi-Fi CSI windows with LoRA on the
real small language model, patch tokens and codebook codes, beside the tiny backbone and the
CNN / GRU of ``run.py`` on the same windows (one seed: a SmolLM2 run takes minutes on this CPU).

    .venv/bin/python experiments/sensing/smollm2.py            # smollm2.md here
    .venv/bin/python experiments/sensing/smollm2.py --quick    # a smoke test (/tmp)

Every number in smollm2.md is computed by this script from the runs it makes."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
sys.path.insert(0, str(HERE))  # first: this folder's run.py, not air_interface's
from common import THREADS, git_rev, lam_run, machine, mean, results  # noqa: E402
from run import CONFIG, FULL, QUICK, Sizes, baseline_runs, lam_cost, lam_scores, overrides  # noqa: E402

from edgelam.sensing.data import build_sensing_data  # noqa: E402

SEED = 0
ROWS = ("CNN (raw CSI)", "GRU (raw CSI)", "tiny, patch tokens", "tiny, codes (K = 64)",
        "SmolLM2-135M, patch tokens", "SmolLM2-135M, codes (K = 64)")


def lam_rows(sz: Sizes, tmp: Path, res: dict, smol_steps: int) -> None:
    runs = {"tiny, patch tokens": ("tiny", []), "tiny, codes (K = 64)": ("tiny", ["sensing.tokenizer=vq"]),
            "SmolLM2-135M, patch tokens": ("smollm2", []),
            "SmolLM2-135M, codes (K = 64)": ("smollm2", ["sensing.tokenizer=vq"])}
    for i, (name, (model, extra)) in enumerate(runs.items()):
        steps = [f"train.local_steps={smol_steps}"] if model == "smollm2" else []
        folder = tmp / f"run{i}"
        t0 = time.perf_counter()
        cfg, _ = lam_run(CONFIG, overrides(sz, SEED, f"model.name={model}", *extra, *steps), folder)
        res[("wall", name, "s")].append(time.perf_counter() - t0)
        data, _ = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
        held = [s for xs in data.global_eval.values() for s in xs]
        m = lam_scores(folder, held)
        res[("sim", name, "accuracy")].append(m["accuracy"])
        res[("sim", name, "macro_f1")].append(m["macro_f1"])
        params, ms = lam_cost(folder, held)
        res[("sim", name, "params")].append(params)
        res[("sim", name, "ms")].append(ms)
        print(f"{name}: {m['accuracy']:.3f} in {res[('wall', name, 's')][-1]:.0f} s", flush=True)
    cfg, _ = lam_run(CONFIG, overrides(sz, SEED, "fl.rounds=1", "train.local_steps=1"), tmp / "cfg")
    baseline_runs(cfg, sz, SEED, res, "sim")
    for name in ("CNN (raw CSI)", "GRU (raw CSI)"):
        res[("sim", name, "params")] = res[("cost", name, "params")]
        res[("sim", name, "ms")] = res[("cost", name, "ms")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, written to /tmp (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    sz, smol_steps = (QUICK, 1) if args.quick else (FULL, FULL.local_steps)
    out = Path(tempfile.gettempdir()) / "sensing_smollm2_quick" if args.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    t0, res = time.perf_counter(), results()
    with tempfile.TemporaryDirectory() as tmp:
        lam_rows(sz, Path(tmp), res, smol_steps)
    cmd = shlex.join([".venv/bin/python", "experiments/sensing/smollm2.py", *sys.argv[1:]])
    wall = " ".join(f"{n}: {res[('wall', n, 's')][0] / 60:.1f} min;" for n in ROWS if res.get(("wall", n, "s")))
    lines = [
        "# Sensing with SmolLM2-135M (one seed)", "",
        f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `{cmd}` (from the repository root, git {git_rev()})",
        f"- Wall time: {(time.perf_counter() - t0) / 60:.1f} min ({wall.rstrip(';')})", f"- Seed: {SEED} (one seed)", "",
        (f"`configs/{CONFIG}` with `model.name=smollm2`: the generated windows of `run.py` (3 clients, "
         f"{sz.per_class} windows per activity each, {sz.eval_per_class} held out per activity), FedAvg, {sz.rounds} "
         f"rounds; the tiny backbone {sz.local_steps} local steps, SmolLM2 {smol_steps}, both at lr 0.01 (SmolLM2: all "
         "30 blocks, LoRA r 4 on q_proj and v_proj; the sensor embedding, the head and the norms trained in full). CNN / GRU: trained centrally on the raw windows, as in `run.py`. Inference: one window, batch 1, "
         "this CPU, median of 20."), "",
        "| model | accuracy | macro-F1 | parameters trained | ms per window |", "|---|---|---|---|---|",
        *[f"| {r} | {mean(res[('sim', r, 'accuracy')]):.3f} | {mean(res[('sim', r, 'macro_f1')]):.3f} | "
          f"{mean(res[('sim', r, 'params')]):,.0f} | {mean(res[('sim', r, 'ms')]):.2f} |" for r in ROWS], ""]
    (out / "smollm2.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'smollm2.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
