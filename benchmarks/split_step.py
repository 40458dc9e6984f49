"""Cost of simulating split learning: one split step against the same step on the unsplit model.

Both do forward + backward of the same model (LoRA, and a classifier for an encoder) on the same
batch; the split step additionally cuts autograd at each link, encodes and decodes every tensor
that crosses it, and runs the segments through ``torch.func.functional_call`` with per-device
tensors. Runs alternate (split, unsplit, split, ...) in one process; medians are reported.

    .venv/bin/python benchmarks/split_step.py --model minilm --batch 16 --seq 64 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from edgelam.config import LoraConfig
from edgelam.models.split import build_split
from edgelam.split.step import leaves, step


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    decoder = args.model not in ("minilm", "tiny-encoder")
    targets = ("q_proj", "v_proj") if decoder else ("query", "value")
    sm = build_split(args.model, LoraConfig(8, 16, 0.0, targets), None, 2, False, seed=0)
    ids = torch.randint(1000, 2000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    labels = ids if decoder else torch.randint(0, 2, (args.batch,))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    dev_state, srv_state = sm.initial_state()
    device = {s: leaves(dev_state, s) for s in ("front", "back")}
    server = leaves(srv_state, "middle")

    def split(codec: str) -> float:
        t = time.perf_counter()
        step(sm, device, server, batch, codec, codec)
        return time.perf_counter() - t

    def unsplit() -> float:
        t = time.perf_counter()
        if decoder:
            loss = sm.peft(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = F.cross_entropy(sm.back.head(sm.peft(input_ids=ids, attention_mask=mask).last_hidden_state, mask), labels)
        loss.backward()
        return time.perf_counter() - t

    sm.peft.train()
    split("float32"), unsplit()  # warm-up
    times: dict[str, list[float]] = {"unsplit": [], "split float32": [], "split int8": []}
    for _ in range(args.repeats):
        times["split float32"].append(split("float32"))
        times["unsplit"].append(unsplit())
        times["split int8"].append(split("int8"))
    base = statistics.median(times["unsplit"])
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians)")
    print("| step | median s | ratio to unsplit |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.4f} | {statistics.median(ts) / base:.3f} |")
    sm.peft.unload()


if __name__ == "__main__":
    main()
