"""Batched multi-adapter training (``runtime.batch_clients``, ``fl/batched.py``) against clients trained
one after another, side by side on the same works: simulated clients trained per second.

Each case builds a real run (SmolLM2-135M, LoRA r = 8 on q/v, the demo's clients and data with
LoRA dropout 0) and one round's works for K clients; each repeat runs the same works through the
sequential executor and the batched one (order alternating per repeat, so drift hits both), and
checks the updates agree. Reported: median seconds per round of K trips (min..max), clients/s and
the speed-up per repeat pair (median, min..max).

    .venv/bin/python benchmarks/batched_training.py                  # the recorded cases
    .venv/bin/python benchmarks/batched_training.py --repeats 3 --cases 4x1x64 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgelam.config_load import load_config
from edgelam.fl.batched import BatchedExecutor
from edgelam.fl.driver import FLDriver
from edgelam.fl.executor import LocalExecutor
from edgelam.fl.rounds import make_work
from edgelam.store import Purpose, torch_seed_for

REPO = Path(__file__).resolve().parents[1]
# K clients x per-client batch x max tokens per example
CASES = ("4x1x64", "8x1x64", "4x1x128", "4x2x128", "4x4x128")


def one_case(case: str, model: str, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    k, batch, length = (int(x) for x in case.split("x"))
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"model.name={model}", "model.lora.dropout=0", f"train.local_steps={steps}", f"train.batch_size={batch}",
        f"data.max_length={length}", f"data.num_clients={max(k, 10)}", f"threads={threads}", "fl.fraction=1.0"])
    drv = FLDriver(cfg)
    try:
        ctx, st = drv.ctx, drv.initial_state()
        works = [make_work(ctx, st.state, 1, c, torch_seed_for(cfg.seed, Purpose.TRAIN, 1, c)) for c in range(k)]
        runners = {"sequential": LocalExecutor(ctx), "batched": BatchedExecutor(ctx, k)}
        runners["batched"].run(works[:2])  # warm-up: allocator, first slot creation
        times: dict[str, list[float]] = {n: [] for n in runners}
        diff = 0.0
        for r in range(repeats):
            out = {}
            for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
                t0 = time.perf_counter()
                out[name] = runners[name].run(works)
                times[name].append(time.perf_counter() - t0)
            diff = max(diff, *(float((a.update.state[n] - b.update.state[n]).abs().max())
                               for a, b in zip(out["sequential"], out["batched"]) for n in a.update.state))
        tokens = sum(r.update.tokens for r in out["sequential"])
        ratios = [s / b for s, b in zip(times["sequential"], times["batched"])]
        return {"case": case, "clients": k, "batch": batch, "max_length": length, "steps": steps,
                "tokens_per_round": tokens, "max_abs_diff": diff,
                "seconds": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in times.items()},
                "clients_per_s": {n: k / statistics.median(v) for n, v in times.items()},
                "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    finally:
        drv.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cases", nargs="+", default=list(CASES), help="KxBxT: clients x per-client batch x max tokens")
    ap.add_argument("--steps", type=int, default=2, help="local steps per trip")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "batched_training.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for case in args.cases:
        res = one_case(case, args.model, args.steps, args.repeats, args.threads)
        s, sp = res["seconds"], res["speedup"]
        print(f"{case:>8}  sequential {s['sequential']['median']:.2f} s  batched {s['batched']['median']:.2f} s  "
              f"speed-up {sp['median']:.2f}x ({sp['min']:.2f}..{sp['max']:.2f})  max |diff| {res['max_abs_diff']:.1e}",
              flush=True)
        results.append(res)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]), "results": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
