"""The attack x defence matrix on real data (SST-2, all-MiniLM-L6-v2 with LoRA, 10 clients, FedAvg
rounds): five attacks at 10 % and 30 % malicious clients against five aggregation rules; 3 seeds
for the cells of the issue's target (30 % sign-flip and scaling, and no attack, under FedAvg and
Multi-Krum), one seed elsewhere (a 3-seed matrix would take about 3 hours here). Run it as
parallel workers (``--worker 0/2`` and ``--worker 1/2``, then once without ``--worker`` to write
the report).

Attacks (``fl.attack``): sign_flip (scale 5: each attacker sends start - 5 x its delta), scaling
(model replacement, scale 10), gaussian (N(0, 0.05^2) per coordinate: honest entries move about
lr x steps = 0.006), label_flip (every label flipped), backdoor (half the attackers' examples
get the trigger "cf" and the label "positive"; the success rate is measured on triggered negative
test sentences). Defences (``fl.aggregator`` / ``fl.norm_bound``): mean (FedAvg), coordinate-wise
median, trimmed mean (f = 3 cut from each side), Multi-Krum (f = 3), FedAvg with the server
bounding each delta to the median honest norm of the clean runs.

    .venv/bin/python experiments/robustness/matrix.py           # matrix.md and matrix.png here
    .venv/bin/python experiments/robustness/matrix.py --quick   # a smoke test (/tmp)

Every number in matrix.md is computed by this script from the runs it makes; the runs' summaries
are cached in matrix_runs.json (not committed) so an interrupted experiment resumes."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
from common import fmt, git_rev, lam_run, machine, mean, results  # noqa: E402

from edgelam.store import read_jsonl  # noqa: E402

CONFIG = "fl_sst2_minilm.yaml"
ATTACKS = {  # name -> fl.attack overrides
    "sign_flip": ["fl.attack.kind=sign_flip", "fl.attack.scale=5"],
    "scaling": ["fl.attack.kind=scaling", "fl.attack.scale=10"],
    "gaussian": ["fl.attack.kind=gaussian", "fl.attack.scale=0.05"],
    "label_flip": ["fl.attack.kind=label_flip"],
    "backdoor": ["fl.attack.kind=backdoor", "fl.attack.target=positive", "fl.attack.poison_rate=0.5"],
}
DEFENCES = {  # name -> overrides; "norm_bound" gets its bound from the clean runs
    "FedAvg": ["fl.aggregator=mean"],
    "median": ["fl.aggregator=median"],
    "trimmed mean": ["fl.aggregator=trimmed_mean", "fl.byzantine=3"],
    "Multi-Krum": ["fl.aggregator=multi_krum", "fl.byzantine=3"],
    "norm bound": ["fl.aggregator=mean"],
}


# the cells the target is about get 3 seeds; the rest of the matrix one (said in the tables)
KEY = {("no attack", "FedAvg"), ("no attack", "Multi-Krum"),
       *((f"{a} 30 %", d) for a in ("sign_flip", "scaling") for d in ("FedAvg", "Multi-Krum"))}


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]  # every cell
    key_seeds: tuple[int, ...]  # the KEY cells
    fractions: tuple[float, ...]
    rounds: int
    steps: int
    per_client: int
    eval_n: int
    lr: float
    attacks: tuple[str, ...] = tuple(ATTACKS)


FULL = Sizes(seeds=(0,), key_seeds=(0, 1, 2), fractions=(0.1, 0.3), rounds=6, steps=4, per_client=48, eval_n=300,
             lr=0.005)
QUICK = Sizes(seeds=(0,), key_seeds=(0,), fractions=(0.3,), rounds=1, steps=1, per_client=8, eval_n=32, lr=0.005,
              attacks=("sign_flip", "backdoor"))
CACHE: dict[str, dict] = {}


def common(sz: Sizes, seed: int) -> list[str]:
    return [f"seed={seed}", "data.num_clients=10", "data.partition=iid", f"data.max_examples_per_client={sz.per_client}",
            "data.max_length=32", f"train.local_steps={sz.steps}", f"train.lr={sz.lr}", f"fl.rounds={sz.rounds}",
            f"eval.every={sz.rounds}",
            f"eval.max_per_task={sz.eval_n}", "threads=1"]


def cached_run(name: str, overrides: list[str], tmp: Path, cache: Path) -> dict:
    if name not in CACHE:
        _, summary = lam_run(CONFIG, overrides, tmp / name)
        rows = read_jsonl(tmp / name / "metrics.jsonl")
        norms = [c["delta_norm"] for r in rows for c in r.get("client_stats", []) if c.get("delta_norm")]
        CACHE[name] = {"loss": summary["final_eval_loss"], "accuracy": summary.get("final_eval_accuracy"),
                       "asr": summary.get("final_backdoor_asr"), "first_loss": summary["first_eval_loss"],
                       "norms": norms, "wall_s": summary["wall_s"]}
        mine = {k: v for k, v in CACHE.items() if k in OWN}
        OWN.add(name)
        cache.write_text(json.dumps(mine | {name: CACHE[name]}))
    return CACHE[name]


OWN: set[str] = set()  # the runs this process made (its own cache file)


def cells(sz: Sizes) -> list[tuple[str, str, int, str, list[str]]]:
    """(row, defence, seed, run name, overrides without the norm bound), clean runs first."""
    seeds = lambda row, d: sz.key_seeds if (row, d) in KEY else sz.seeds  # noqa: E731
    out = [("no attack", d, seed, f"clean-{d}-{seed}", [*common(sz, seed), *DEFENCES[d]])
           for d in DEFENCES for seed in seeds("no attack", d)]
    for a in sz.attacks:
        for f in sz.fractions:
            if a == "gaussian" and f < max(sz.fractions):
                continue  # a random update: only the larger share
            row = f"{a} {int(f * 100)} %"
            out += [(row, d, seed, f"{a}-{f}-{d}-{seed}", [*common(sz, seed), *ATTACKS[a], f"fl.attack.fraction={f}", *DEFENCES[d]])
                    for d in DEFENCES for seed in seeds(row, d)]
        if a == "backdoor":  # nobody poisons: how often the trigger gets "positive" from a clean model
            out.append(("backdoor 0 % (reference)", "FedAvg", sz.seeds[0], "backdoor-0.0-FedAvg-0",
                        [*common(sz, sz.seeds[0]), *ATTACKS[a], "fl.attack.fraction=0", *DEFENCES["FedAvg"]]))
    return out


def load_caches(out: Path, pattern: str) -> None:
    for path in sorted(out.glob(pattern)):
        try:
            CACHE.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # being written by another worker: read again later


def norm_bound(sz: Sizes, out: Path, pattern: str) -> float:
    """The median honest delta norm of the clean FedAvg runs (waits for another worker's)."""
    names = [f"clean-FedAvg-{s}" for s in sz.key_seeds]
    while not all(n in CACHE for n in names):
        time.sleep(10)
        load_caches(out, pattern)
    return statistics.median(n for name in names for n in CACHE[name]["norms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", type=str, default=None, help="k/n: run only every n-th run from the k-th (parallel workers, "
                    "each writes its own cache); without it, run what is missing and write the report")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    stem = "matrix_runs_quick" if args.quick else "matrix_runs"
    pattern = f"{stem}*.json"
    load_caches(out, pattern)
    k, n = (int(x) for x in args.worker.split("/")) if args.worker else (0, 1)
    cache = out / (f"{stem}.{k}.json" if args.worker else f"{stem}.json")
    OWN.update(json.loads(cache.read_text()) if cache.exists() else {})
    tmp = Path(tempfile.mkdtemp(prefix="edgelam-robust-"))
    todo = cells(sz)
    for i, (row, d, seed, name, over) in enumerate(sorted(todo, key=lambda c: c[1] == "norm bound")):
        if i % n != k:
            continue
        extra = [f"fl.norm_bound={norm_bound(sz, out, pattern):.6g}"] if d == "norm bound" else []
        load_caches(out, pattern)
        cached_run(name, [*over, *extra], tmp, cache)
    if args.worker:
        return
    res = results()
    rows: list[str] = []
    for row, d, seed, name, _ in todo:
        r = CACHE[name]
        rows += [] if row in rows else [row]
        res[("loss", row, d)].append(r["loss"])
        res[("acc", row, d)].append(r["accuracy"])
        if r["asr"] is not None:
            res[("asr", row, d)].append(r["asr"])
    first = mean([CACHE[f"clean-FedAvg-{s}"]["first_loss"] for s in sz.key_seeds])
    write_report(out, sz, res, rows, norm_bound(sz, out, pattern), first, sum(CACHE[c[3]]["wall_s"] for c in todo))
    print(f"wrote {out / 'matrix.md'}")


def within(res, row: str, d: str) -> str:  # type: ignore[no-untyped-def]
    """How far the mean final loss is above the clean FedAvg run's, in %."""
    clean = mean(res[("loss", "no attack", "FedAvg")])
    return f"{100 * (mean(res[('loss', row, d)]) / clean - 1):+.1f} %" if res.get(("loss", row, d)) else "–"


def write_report(out: Path, sz: Sizes, res, rows: list[str], bound: float, first: float, secs: float) -> None:  # type: ignore[no-untyped-def]
    cols = list(DEFENCES)
    head = ["attack (malicious share)", *cols]
    lines = [
        "# Attack x defence matrix (SST-2, all-MiniLM-L6-v2 + LoRA, 10 clients)", "",
        f"Generated by `{shlex.join(['python', 'experiments/robustness/matrix.py', *(['--quick'] if sz is QUICK else [])])}` "
        f"on {datetime.date.today()} at commit {git_rev()} ({machine().split(',')[0]}, 1 torch thread per run); "
        f"{len(cells(sz))} runs, {secs / 60:.0f} min of runs. "
        f"Seeds: {list(sz.key_seeds)} (mean ± std) for the clean, sign_flip 30 % and scaling 30 % rows under FedAvg "
        f"and Multi-Krum; one seed (seed 0, marked) elsewhere. Gaussian noise only at 30 %. Set-up: `configs/{CONFIG}` with 10 clients (iid), "
        f"{sz.per_client} examples each, {sz.rounds} rounds x {sz.steps} local steps of batch 8 (lr {sz.lr}), every client "
        f"every round; eval on {sz.eval_n} SST-2 test sentences. Untrained eval loss {first:.4f}. Norm bound: the median "
        f"honest delta norm of the clean FedAvg runs, {bound:.4g}.", "",
        "## Final eval loss", "", *md_table(res, "loss", rows, cols, head, 4), "",
        "## Final eval loss against the attack-free FedAvg run", "",
        "| attack | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1),
        *[f"| {r} | " + " | ".join(within(res, r, d) for d in cols) + " |" for r in rows], "",
        "## Final accuracy", "", *md_table(res, "acc", rows, cols, head, 3), "",
        "## Backdoor success rate (triggered negative sentences classified positive)", "",
        *md_table(res, "asr", [r for r in rows if r.startswith("backdoor")], cols, head, 3), "",
        "The reference row: the same triggered sentences under a model no one poisoned (seed 0, FedAvg): the "
        "trigger's base rate, errors of the clean classifier on negative sentences with \"cf\" in front.", "",
    ]
    (out / "matrix.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(cols)
    for i, d in enumerate(cols):
        ys = [mean(res[("loss", r, d)]) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ys, width, label=d)
    ax.axhline(mean(res[("loss", "no attack", "FedAvg")]), color="k", lw=0.8, ls="--")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final eval loss (SST-2)")
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=120)
    plt.close(fig)


def md_table(res, name: str, rows: list[str], cols: list[str], head: list[str], digits: int) -> list[str]:  # type: ignore[no-untyped-def]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(fmt(res.get((name, r, c), []), digits) for c in cols) + " |")
    return lines


if __name__ == "__main__":
    main()
