"""Tokens/s of one EdgeLAM client's local LoRA training against a bare PyTorch + PEFT loop.

Both train the same model with the same LoRA settings, batch size and sequence length; runs are
interleaved (edgelam, bare, edgelam, bare, ...) in one process so machine noise hits both alike.
Also reports the achieved FLOP/s (EdgeLAM's analytic count, checked against torch's FLOP counter
in tests/test_flops.py) against the machine's measured fp32 GEMM peak.

    .venv/bin/python benchmarks/client_step.py --model smollm2 --batch 4 --seq 128 --steps 4 --repeats 6
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from edgelam.config import LoraConfig as LoraSettings
from edgelam.config import TrainConfig
from edgelam.data.format import Encoded
from edgelam.fl.client import local_train
from edgelam.models.flops import flop_model, lora_train_flops
from edgelam.models.load import load_base
from edgelam.models.lora import attach_lora, get_adapter_state, set_adapter_state


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()}"
    except OSError:
        pass
    return platform.machine()


def gemm_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Best achieved fp32 FLOP/s of an n x n matmul: the practical peak of this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def bare_loop(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float) -> float:
    """The reference: AdamW over the LoRA parameters, forward/backward/clip/step. Returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()

    base = load_base(args.model, "float32", 0)
    settings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(base.tokenizer) - 1, (args.batch, args.seq), generator=gen)
    # EdgeLAM's client gets the same token ids as fixed-length examples, every token labelled.
    data = [Encoded(tuple(row.tolist()), tuple(row.tolist()), "bench") for row in ids]
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr=1e-4, max_grad_norm=1.0)
    tokens = args.batch * args.seq * args.steps

    # One PEFT model serves both loops (reset to the same initial adapter before each run), so
    # they differ only in the loop itself; the order alternates to cancel warm-up and drift.
    model = attach_lora(base.model, settings, seed=0)
    init = get_adapter_state(model)
    fm = flop_model(model)
    ours, bare = [], []
    for rep in range(args.repeats + 1):  # the first pair warms up and is dropped
        for which in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
            set_adapter_state(model, init)
            t = time.perf_counter()
            if which == "ours":
                upd = local_train(model, init, data, train, 0.0, seed=0, pad_id=0, fm=fm)
                ours.append(time.perf_counter() - t)
            else:
                bare.append(bare_loop(model, ids, args.steps, 1e-4))
    model.unload()
    ours, bare = ours[1:], bare[1:]
    ours_tps, bare_tps = tokens / statistics.median(ours), tokens / statistics.median(bare)
    achieved = upd.flops / statistics.median(ours)
    peak = gemm_peak_flops()
    print(f"machine: {cpu_name()} torch threads, torch {torch.__version__}")
    print(f"model {args.model}, LoRA r=8 q/v, batch {args.batch} x seq {args.seq}, {args.steps} steps x {args.repeats} repeats")
    pair = sorted(b / o for o, b in zip(ours, bare))  # per alternating pair: EdgeLAM's speed / bare speed
    print("| loop | median s (min..max) | tokens/s | ratio (per-pair min..max) |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch + PEFT | {statistics.median(bare):.2f} ({min(bare):.2f}..{max(bare):.2f}) | {bare_tps:.1f} | 1.00 |")
    print(f"| EdgeLAM client (local_train) | {statistics.median(ours):.2f} ({min(ours):.2f}..{max(ours):.2f}) | "
          f"{ours_tps:.1f} | {ours_tps / bare_tps:.3f} ({pair[0]:.3f}..{pair[-1]:.3f}) |")
    print(f"FLOPs per step (analytic): {upd.flops / args.steps:.3e}; achieved {achieved / 1e9:.1f} GFLOP/s; "
          f"fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s; utilisation {achieved / peak:.1%}")
    assert lora_train_flops(fm, tokens, args.seq) == upd.flops


if __name__ == "__main__":
    main()
