"""Secure aggregation's cost (Bonawitz et al. CCS 2017, ``edgelam.privacy.secagg``) for one LoRA
update of SmolLM2-135M: CPU seconds per client per protocol round, the server's CPU, and the bytes
SecAgg adds on top of the masked update, held against a client's local training time.

The update's size comes from the shapes, not from the model (nothing is loaded): LoRA r = 8 on
q_proj and v_proj of 30 blocks, hidden 576, k/v width 192 (3 KV heads x 64), so per block
q: A 8x576 + B 576x8 and v: A 8x576 + B 192x8. The vectors are random (N(0, 0.01), a LoRA delta's
scale): SecAgg's work does not depend on the values. Each of ``--repeats`` runs is one whole
``secure_sum`` of ``--clients`` clients with threshold ``--threshold``, once per ``--drops`` value
(clients silent after ShareKeys: the server then reconstructs their keys and removes their pairwise
masks). Reported: median and min..max over clients and repeats; ``--train-seconds`` is one client's
local training time for the round; ``--measure-train`` measures it here instead, in the same
process, alternating with the SecAgg runs: SmolLM2-135M (bundled) with LoRA r = 8 on q/v,
``local_train`` for 4 steps of batch 4 x 128 tokens (``benchmarks/client_step.py``'s setting),
and checks that the real adapter has the size the shapes give.

    .venv/bin/python benchmarks/secagg.py --measure-train
    .venv/bin/python benchmarks/secagg.py --train-seconds 12.4
    .venv/bin/python benchmarks/secagg.py --repeats 1 --out /tmp/secagg.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelam.privacy.secagg import ROUNDS, SecAggParams, SecAggResult, secure_sum
from edgelam.store import atomic_write_json


@dataclass(frozen=True)
class LoraShape:
    """SmolLM2-135M (config.json: 30 layers, hidden 576, 9 heads, 3 KV heads of 64) with LoRA r on q and v."""

    layers: int = 30
    hidden: int = 576
    kv_dim: int = 192
    r: int = 8

    def matrices(self) -> dict[str, tuple[int, int]]:
        """One block's LoRA matrices: name -> (rows, cols), as PEFT stores them (A: r x in, B: out x r)."""
        return {"q_proj.lora_A": (self.r, self.hidden), "q_proj.lora_B": (self.hidden, self.r),
                "v_proj.lora_A": (self.r, self.hidden), "v_proj.lora_B": (self.kv_dim, self.r)}

    def params(self) -> int:
        return self.layers * sum(rows * cols for rows, cols in self.matrices().values())


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> str:
    """lscpu's model name and the number of CPUs."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    except (OSError, subprocess.CalledProcessError):
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def run_scenario(dim: int, n: int, params: SecAggParams, drops: int, repeats: int, seed: int) -> dict[str, Any]:
    """``repeats`` whole protocol runs; clients 0..drops-1 go silent after ShareKeys."""
    rng = np.random.default_rng(seed)
    results: list[SecAggResult] = []
    wall_s: list[float] = []
    for rep in range(repeats):
        vectors = {u: rng.normal(0.0, 0.01, dim) for u in range(n)}
        start = time.perf_counter()
        results.append(secure_sum(vectors, params, seed=seed + rep, drop_after_share=range(drops)))
        wall_s.append(time.perf_counter() - start)
        plain = sum(vectors[u] for u in results[-1].survivors)
        error = float(np.abs(results[-1].total - plain).max())
        bound = len(results[-1].survivors) * 2 * params.clip / (2**params.bits - 1)
        if error > bound:
            raise RuntimeError(f"secure sum off by {error:.3g} > quantisation bound {bound:.3g}")
    survivor = results[0].survivors[0]
    traffic = results[0].traffic[survivor]  # every survivor sends and receives the same bytes
    rounds = {rnd: spread([r.round_cpu_s[u][rnd] for r in results for u in r.survivors]) for rnd in ROUNDS}
    return {
        "drops": drops,
        "client_cpu_s": {**rounds, "total": spread([r.cpu_s[u] for r in results for u in r.survivors])},
        "server_cpu_s": {**{rnd: spread([r.server_round_cpu_s[rnd] for r in results]) for rnd in ROUNDS},
                         "total": spread([r.server_cpu_s for r in results])},
        "wall_s": spread(wall_s),
        "bytes": {"masked": traffic.masked_bytes, "extra_up": traffic.extra_up,
                  "extra_down": traffic.extra_down, "up": traffic.up, "down": traffic.down,
                  "plain_float32_update": 4 * dim},
    }


class Trainer:
    """One SmolLM2 client's local training (EdgeLAM's ``local_train``), timed per call."""

    def __init__(self, steps: int = 4, batch: int = 4, seq: int = 128) -> None:
        import torch

        from edgelam.config import LoraConfig as LoraSettings
        from edgelam.config import TrainConfig
        from edgelam.data.format import Encoded
        from edgelam.models.flops import flop_model
        from edgelam.models.load import load_base
        from edgelam.models.lora import attach_lora, get_adapter_state

        base = load_base("smollm2", "float32", 0)
        self.model = attach_lora(base.model, LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")),
                                 seed=0)
        self.init = get_adapter_state(self.model)
        self.params = sum(t.numel() for t in self.init.values())
        ids = torch.randint(0, len(base.tokenizer) - 1, (batch, seq), generator=torch.Generator().manual_seed(0))
        self.data = [Encoded(tuple(row.tolist()), tuple(row.tolist()), "bench") for row in ids]
        self.train = TrainConfig(local_steps=steps, batch_size=batch, lr=1e-4, max_grad_norm=1.0)
        self.fm = flop_model(self.model)

    def __call__(self) -> float:
        from edgelam.fl.client import local_train

        t = time.perf_counter()
        local_train(self.model, self.init, self.data, self.train, 0.0, seed=0, pad_id=0, fm=self.fm)
        return time.perf_counter() - t


def print_table(report: dict[str, Any]) -> None:
    train_s = report["train_seconds"]
    for sc in report["scenarios"]:
        print(f"\n{sc['drops']} of {report['clients']} clients drop after ShareKeys "
              f"(t={report['threshold']}, {report['repeats']} repeats; wall {sc['wall_s']['median']:.3f} s per run)")
        print("| round | client CPU s, median (min..max) | server CPU s, median (min..max) |")
        print("|---|---|---|")
        for rnd in (*ROUNDS, "total"):
            c, s = sc["client_cpu_s"][rnd], sc["server_cpu_s"][rnd]
            print(f"| {rnd} | {c['median']:.4f} ({c['min']:.4f}..{c['max']:.4f}) | "
                  f"{s['median']:.4f} ({s['min']:.4f}..{s['max']:.4f}) |")
        b = sc["bytes"]
        print(f"bytes per client: masked input {b['masked']:,} (plain float32 update {b['plain_float32_update']:,}); "
              f"extra up {b['extra_up']:,} ({b['extra_up'] / b['masked']:.2%} of masked), extra down {b['extra_down']:,}")
        cpu = sc["client_cpu_s"]["total"]["median"]
        vs = f"{cpu / train_s:.3%} of the {train_s:g} s local training" if train_s else "no --train-seconds given"
        print(f"client SecAgg CPU per round: {cpu:.4f} s, {vs}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--threshold", type=int, default=6)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--drops", type=int, nargs="+", default=[0, 2], help="clients silent after ShareKeys")
    ap.add_argument("--train-seconds", type=float, default=None, help="one client's local training time per round")
    ap.add_argument("--measure-train", action="store_true", help="time SmolLM2 local training here (repeats + 1 runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/secagg.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1 (got {args.repeats})")
    shape = LoraShape()
    params = SecAggParams(threshold=args.threshold, bits=args.bits, clip=args.clip)
    train_runs: list[float] = []
    if args.measure_train:
        trainer = Trainer()
        if trainer.params != shape.params():
            raise SystemExit(f"the real SmolLM2 adapter has {trainer.params} values, the shapes give {shape.params()}")
        trainer()  # warm-up, dropped
        for rep in range(args.repeats):  # alternate training with a SecAgg run, so drift hits both
            train_runs.append(trainer())
            run_scenario(shape.params(), args.clients, params, 0, 1, args.seed + 100 + rep)
        args.train_seconds = statistics.median(train_runs)
    report = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": shlex.join([".venv/bin/python", *sys.argv]),  # repository-relative, not this machine's path
        "model": "SmolLM2-135M", "lora": {**shape.__dict__, "targets": ["q_proj", "v_proj"]},
        "dim": shape.params(), "clients": args.clients, "threshold": args.threshold, "bits": args.bits,
        "clip": args.clip, "repeats": args.repeats, "train_seconds": args.train_seconds,
        "train_runs_s": train_runs,
        "scenarios": [run_scenario(shape.params(), args.clients, params, d, args.repeats, args.seed)
                      for d in args.drops],
    }
    print(f"machine: {report['machine']}; SmolLM2-135M LoRA r={shape.r} q/v update: {report['dim']:,} values")
    print_table(report)
    atomic_write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
