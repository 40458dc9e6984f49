"""Leave-one-recording-out on the 24 real Intel 5300 activity recordings: each recording held out in
turn (``sensing.folds: 24``), the LAM (patch tokens, codebook codes) federated over 4 clients
holding the other 23 recordings, against a CNN and a GRU trained centrally on the same 23.

    .venv/bin/python experiments/sensing/loro.py            # loro.md here
    .venv/bin/python experiments/sensing/loro.py --quick    # a smoke test: 2 folds (/tmp)

Every number in loro.md is computed by this script from the runs it makes."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
sys.path.insert(0, str(HERE))  # first: this folder's run.py
from common import THREADS, git_rev, lam_run, machine  # noqa: E402
from run import CONFIG, FULL, QUICK, overrides, stacked  # noqa: E402

from edgelam.infer.modules import ModuleHost, ModuleSpec  # noqa: E402
from edgelam.sensing.baselines import CNNClassifier, GRUClassifier, fit  # noqa: E402
from edgelam.sensing.data import build_sensing_data  # noqa: E402
from edgelam.tasks.base import add_sums  # noqa: E402
from edgelam.tasks.sensing import ActivityRecognition  # noqa: E402

RECORDINGS = 24
MODELS = ("CNN (raw CSI)", "GRU (raw CSI)", "LAM patch tokens", "LAM codes (K = 64)")


def lam_logits(out: Path, held: list) -> torch.Tensor:
    host = ModuleHost(None, ModuleSpec("full"), {"s": str(out / "adapter")})
    with torch.no_grad(), host.served.use("s"):
        return host.task.output(host.served.model, host.task.collate(held)).float()


def fold_logits(sz, fold: int, tmp: Path) -> tuple[dict[str, torch.Tensor], list, tuple[str, ...]]:
    extra = ["data.source=wifi", "data.partition=by_task", "data.num_clients=4", f"sensing.folds={RECORDINGS}",
             f"sensing.fold={fold}"]
    cfg, _ = lam_run(CONFIG, overrides(sz, 0, *extra), tmp / "patch")
    lam_run(CONFIG, overrides(sz, 0, *extra, "sensing.tokenizer=vq"), tmp / "vq")
    data, shape = build_sensing_data(cfg.sensing, cfg.data, cfg.seed)
    held = [s for xs in data.global_eval.values() for s in xs]
    x, y = stacked([s for c in data.clients for s in c.train])
    hx, _ = stacked(held)
    logits = {"LAM patch tokens": lam_logits(tmp / "patch", held), "LAM codes (K = 64)": lam_logits(tmp / "vq", held)}
    for name, make in (("CNN (raw CSI)", CNNClassifier), ("GRU (raw CSI)", GRUClassifier)):
        torch.manual_seed(0)
        model = make(shape.features, len(shape.classes))
        fit(model, x, y, epochs=sz.epochs, batch_size=16, lr=3e-3, seed=0)
        with torch.no_grad():
            logits[name] = model(hx).float()
    return logits, held, shape.classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 folds, written to /tmp (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    sz, folds = (QUICK, 2) if args.quick else (FULL, RECORDINGS)
    out = Path(tempfile.gettempdir()) / "sensing_loro_quick" if args.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sums: dict[str, dict[str, float]] = defaultdict(dict)  # pooled over every held-out window
    seen_sums: dict[str, dict[str, float]] = defaultdict(dict)  # ... of recordings whose activity is trained on
    per_rec: list[tuple[str, int, dict[str, tuple[float, bool]]]] = []  # recording, windows, model -> (acc, vote)
    classes: tuple[str, ...] = ()
    for fold in range(folds):
        with tempfile.TemporaryDirectory() as tmp:
            logits, held, classes = fold_logits(sz, fold, Path(tmp))
        task = ActivityRecognition(classes, 100, 1, 10, "patch")
        labels = torch.tensor([s.label for s in held])
        label = int(labels[0])
        row: dict[str, tuple[float, bool]] = {}
        for name, lg in logits.items():
            got = task.head_sums(lg, {"labels": labels})
            sums[name] = add_sums(sums[name], got)
            if classes[label] != "sleeping":  # the one recording whose activity no other recording shows
                seen_sums[name] = add_sums(seen_sums[name], got)
            vote = int(torch.bincount(lg.argmax(dim=-1), minlength=len(classes)).argmax())
            row[name] = (got["correct"] / got["count"], vote == label)
        per_rec.append((held[0].task, len(held), row))
        print(f"fold {fold} ({held[0].task}) done at {time.perf_counter() - t0:.0f} s", flush=True)
    task = ActivityRecognition(classes, 100, 1, 10, "patch")
    cmd = shlex.join([".venv/bin/python", "experiments/sensing/loro.py", *sys.argv[1:]])
    lines = [
        "# Sensing: leave-one-recording-out on the real recordings", "",
        f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `{cmd}` (from the repository root, git {git_rev()})",
        f"- Wall time: {(time.perf_counter() - t0) / 60:.1f} min", "- Seed: 0 (one seed; the spread is over recordings)", "",
        (f"The {folds} Intel 5300 activity recordings (2x2 antennas, 30 subcarriers, ~100 packets/s; windows of 100 "
         "frames every 50), each held out in turn (`sensing.folds: 24`); the other 23 dealt to 4 clients whole "
         f"(`data.partition: by_task`). LAM: the tiny backbone, FedAvg, {sz.rounds} rounds x {sz.local_steps} local "
         f"steps. CNN / GRU: trained centrally on the 23 recordings' windows, {sz.epochs} epochs. **This set is tiny: "
         "24 recordings, 6 activities, 10 of them brushing teeth, one sleeping (which no training fold then holds), "
         "several consecutive captures of one session. Read these numbers as a pipeline check on real CSI, not as a "
         "benchmark.**"), "",
        "| model | window accuracy, pooled | macro-F1, pooled | window accuracy, without 'sleeping' | recordings right by majority vote |",
        "|---|---|---|---|---|"]
    for name in MODELS:
        m, seen = task.metrics(sums[name]), task.metrics(seen_sums[name]) if seen_sums[name] else {"accuracy": float("nan")}
        votes = sum(r[2][name][1] for r in per_rec)
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {seen['accuracy']:.3f} | "
                     f"{votes} of {len(per_rec)} |")
    lines += ["", "Per recording (fraction of its windows classified right; ✓: its majority vote is right):", "",
              "| recording | windows | " + " | ".join(MODELS) + " |", "|---|---|" + "---|" * len(MODELS)]
    for rec, n, row in per_rec:
        cells = [f"{row[name][0]:.2f}{' ✓' if row[name][1] else ''}" for name in MODELS]
        lines.append(f"| {rec} | {n} | " + " | ".join(cells) + " |")
    (out / "loro.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'loro.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
