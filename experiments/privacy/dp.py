"""Differential-privacy experiments on the tiny model (3 seeds each):

1. client-level DP-FedAvg, epsilon against eval loss for 10, 100 and 1,000 clients holding the
   same data (an expected cohort of 10 per round: q = 10 / N), at target epsilon 1 ... 16 and
   without DP: where client-level DP becomes usable;
2. DP-FedAvg (synchronous, Poisson cohorts) against DP-FedBuff (asynchronous, noise at every server
   step) at equal simulated time on 20 devices whose CPUs are spread 10x: the epsilon each run's
   accountant reports (the worst-off client) against the eval loss, for three noise multipliers.

    .venv/bin/python experiments/privacy/dp.py            # dp.md and plots here
    .venv/bin/python experiments/privacy/dp.py --quick    # a smoke test (/tmp)

Every number in dp.md is computed by this script from the runs it makes."""

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

import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "air_interface"))
from common import fmt, git_rev, lam_run, line_plot, machine, mean, results, table  # noqa: E402

from edgelam.store import read_jsonl  # noqa: E402

CONFIG = "tiny_dp.yaml"
EXAMPLES_PER_TASK = 1400  # 4,200 examples in all, however many clients share them


@dataclass(frozen=True)
class Sizes:
    seeds: tuple[int, ...]
    clients: tuple[int, ...]
    epsilons: tuple[float, ...]
    rounds: int
    sigmas: tuple[float, ...]  # part 2
    sync_rounds: int
    async_versions: int


FULL = Sizes(seeds=(0, 1, 2), clients=(10, 100, 1000), epsilons=(1.0, 2.0, 4.0, 8.0, 16.0), rounds=10,
             sigmas=(0.5, 1.0, 2.0), sync_rounds=12, async_versions=120)
QUICK = Sizes(seeds=(0,), clients=(10, 100), epsilons=(8.0,), rounds=2, sigmas=(1.0,), sync_rounds=2, async_versions=6)
COMMON = ["data.partition=iid", f"data.examples_per_task={EXAMPLES_PER_TASK}", "eval.client_heldout=false",
          "train.local_steps=2", "train.lr=0.02", "threads=1"]


CACHE: dict[str, dict] = {}  # run name -> what the report needs from it, kept in <out>/dp_runs.json


def cached_run(name: str, overrides: list[str], tmp: Path, cache: Path) -> dict:
    """A run's summary and metrics rows; an interrupted experiment reruns only what it lacks."""
    if name not in CACHE:
        _, summary = lam_run(CONFIG, overrides, tmp / name)
        CACHE[name] = {"summary": summary, "rows": read_jsonl(tmp / name / "metrics.jsonl")}
        cache.write_text(json.dumps(CACHE))
    return CACHE[name]


def scale_runs(sz: Sizes, tmp: Path, cache: Path):  # type: ignore[no-untyped-def]
    """Part 1: (N, epsilon or 'no DP') -> final eval loss per seed, with the first loss and sigma."""
    res = results()
    for n in sz.clients:
        q = min(1.0, 10 / n)
        for seed in sz.seeds:
            base = [*COMMON, f"seed={seed}", f"data.num_clients={n}", f"fl.fraction={q}", f"fl.rounds={sz.rounds}"]
            s = cached_run(f"n{n}-nodp-{seed}", [*base, "privacy.dp.mode=none", "privacy.dp.target_epsilon=null"],
                           tmp, cache)["summary"]
            res[("loss", f"{n}", "no DP")].append(s["final_eval_loss"])
            res[("first", f"{n}", "")].append(s["first_eval_loss"])
            for eps in sz.epsilons:
                s = cached_run(f"n{n}-e{eps}-{seed}", [*base, f"privacy.dp.target_epsilon={eps}"], tmp, cache)["summary"]
                res[("loss", f"{n}", f"{eps:g}")].append(s["final_eval_loss"])
                res[("sigma", f"{n}", f"{eps:g}")].append(s["privacy"]["noise_multiplier"])
                res[("eps", f"{n}", f"{eps:g}")].append(s["privacy"]["epsilon"])
    return res


ASYNC = ["data.num_clients=20", "net.device_cpu_hz=[0.2e9,2.0e9]", "eval.every=1", "privacy.dp.target_epsilon=null"]


def at_time(rows: list[dict], t: float) -> dict:
    """The last evaluated metrics line at or before simulated time t."""
    done = [r for r in rows if r["sim_time_s"] <= t + 1e-9 and r.get("eval_loss") is not None]
    return done[-1]


def async_runs(sz: Sizes, tmp: Path, cache: Path):  # type: ignore[no-untyped-def]
    """Part 2: (scheme, sigma) -> (epsilon, eval loss) per seed at the synchronous run's end time."""
    res = results()
    for seed in sz.seeds:
        for sigma in (*sz.sigmas, 0.0):
            dp = [f"privacy.dp.noise_multiplier={sigma}"] if sigma else ["privacy.dp.mode=none"]
            label = f"sigma {sigma:g}" if sigma else "no DP"
            sync_rows = cached_run(f"sync-{sigma}-{seed}-{sz.sync_rounds}", [*COMMON, *ASYNC, *dp, f"seed={seed}", "fl.fraction=0.5",
                                                            f"fl.rounds={sz.sync_rounds}"], tmp, cache)["rows"]
            arows = cached_run(f"async-{sigma}-{seed}-{sz.async_versions}",
                               [*COMMON, *ASYNC, *dp, f"seed={seed}", "fl.strategy=fedbuff", f"fl.rounds={sz.async_versions}",
                                "fl.asynchronous.buffer_size=5", "fl.asynchronous.staleness=polynomial"], tmp, cache)["rows"]
            horizon = min(sync_rows[-1]["sim_time_s"], arows[-1]["sim_time_s"])  # both read at the same time
            for scheme, row in (("DP-FedAvg (sync, q = 0.5)", at_time(sync_rows, horizon)),
                                ("DP-FedBuff (async, K = 5)", at_time(arows, horizon))):
                res[("loss", scheme, label)].append(row["eval_loss"])
                res[("eps", scheme, label)].append(row.get("dp_epsilon") or 0.0)
                res[("versions", scheme, label)].append(row["round"])
            res[("horizon", "", label)].append(horizon)
    return res


def eps_loss_plot(res, sz: Sizes, path: Path) -> None:  # type: ignore[no-untyped-def]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for scheme in ("DP-FedAvg (sync, q = 0.5)", "DP-FedBuff (async, K = 5)"):
        labels = [f"sigma {s:g}" for s in sz.sigmas]
        xs = [mean(res[("eps", scheme, c)]) for c in labels]
        ys = [mean(res[("loss", scheme, c)]) for c in labels]
        err = [float(np.std(res[("loss", scheme, c)], ddof=1)) if len(sz.seeds) > 1 else 0.0 for c in labels]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=scheme)
        ax.axhline(mean(res[("loss", scheme, "no DP")]), ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent by the worst-off client (log)")
    ax.set_ylabel("eval loss at equal simulated time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sz: Sizes, scale, asy, out: Path, minutes: float, cmd: str) -> str:  # type: ignore[no-untyped-def]
    eps_cols = [f"{e:g}" for e in sz.epsilons]
    ns = [f"{n}" for n in sz.clients]
    lines = [
        "# Differential privacy: client-level DP-FedAvg against the number of clients, and DP under asynchrony",
        "",
        f"Machine: {machine().split(',')[0]}, 1 torch thread. Date: {datetime.date.today()}. Commit {git_rev()}. Command: `{cmd}` "
        f"({minutes:.1f} min of runs). Seeds {list(sz.seeds)}: mean ± std.",
        "",
        "## 1. DP-FedAvg: epsilon against eval loss for 10, 100 and 1,000 clients",
        "",
        f"The tiny model, the synthetic three-task set ({3 * EXAMPLES_PER_TASK:,} examples) shared IID among N "
        f"clients; {sz.rounds} rounds, Poisson cohorts of expected size 10 (q = 10 / N), clipping norm C = 0.5, "
        "sigma calibrated by dp-accounting's RDP accountant so the planned rounds spend the target epsilon at "
        "delta = 1 / (10 N). The work per round is the same for every N; only the population differs.",
        "",
        "Final eval loss (round 0: " + fmt([x for n in ns for x in scale[("first", n, "")]], 3) + "):",
        "",
        *table(scale, "loss", ns, ["no DP", *eps_cols], ["clients N", "no DP", *[f"eps {e}" for e in eps_cols]], 3),
        "",
        "Noise multiplier sigma the target needs (the same for every seed):",
        "",
        *table(scale, "sigma", ns, eps_cols, ["clients N", *[f"eps {e}" for e in eps_cols]], 3),
        "",
        "Share of the non-private improvement kept, (L0 - L_DP) / (L0 - L_noDP), mean over seeds:",
        "",
        "| clients N | " + " | ".join(f"eps {e}" for e in eps_cols) + " |",
        "|---|" + "---|" * len(eps_cols),
    ]
    for n in ns:
        l0, lnd = mean(scale[("first", n, "")]), mean(scale[("loss", n, "no DP")])
        kept = [(l0 - mean(scale[("loss", n, e)])) / (l0 - lnd) if l0 != lnd else float("nan") for e in eps_cols]
        lines.append(f"| {n} | " + " | ".join(f"{k:.2f}" for k in kept) + " |")
    labels = [*(f"sigma {s:g}" for s in sz.sigmas), "no DP"]
    schemes = ["DP-FedAvg (sync, q = 0.5)", "DP-FedBuff (async, K = 5)"]
    lines += [
        "",
        "![epsilon vs loss per N](dp_clients.png)",
        "",
        "## 2. DP-FedAvg against DP-FedBuff at equal simulated time",
        "",
        f"20 devices, CPU clocks spread 10x (0.2-2 GHz), the same data; DP-FedAvg runs up to {sz.sync_rounds} rounds "
        "with Poisson cohorts q = 0.5 and central noise on each round's sum; DP-FedBuff (every device active, buffer "
        f"K = 5, polynomial staleness weight) runs up to {sz.async_versions} server steps and adds N(0, (sigma C)^2) "
        "to every buffer sum. Each pair (same seed and sigma) is read at the same simulated time, the end of the "
        "shorter of the two runs (" + fmt([h for k, v in asy.items() if k[0] == "horizon" for h in v], 2)
        + " s). The epsilon is "
        "each run's own accountant at that time: for DP-FedAvg every client's (amplified by sampling); for "
        "DP-FedBuff the worst-off client's, from the server steps its updates entered and their staleness "
        "weights (no amplification: which devices take part is decided by their speed).",
        "",
        "Eval loss:",
        "",
        *table(asy, "loss", schemes, labels, ["scheme", *labels], 3),
        "",
        "Epsilon spent (delta = 1 / 200):",
        "",
        *table(asy, "eps", schemes, labels[:-1], ["scheme", *labels[:-1]], 2),
        "",
        "Global versions (rounds or server steps) by then:",
        "",
        *table(asy, "versions", schemes, labels, ["scheme", *labels], 1),
        "",
        "![epsilon vs loss, sync vs async](dp_async.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    out = Path(tempfile.mkdtemp()) if args.quick else args.out
    t0 = time.perf_counter()
    cache = out / ("dp_runs_quick.json" if args.quick else "dp_runs.json")
    if cache.exists():
        CACHE.update(json.loads(cache.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        scale = scale_runs(sz, Path(tmp), cache)
        asy = async_runs(sz, Path(tmp), cache)
    # the runs' own wall time (cached runs count too: an interrupted experiment reports what it cost)
    minutes = max((time.perf_counter() - t0) / 60, sum(c["summary"]["wall_s"] for c in CACHE.values()) / 60)
    line_plot(scale, "loss", [f"{n}" for n in sz.clients], [f"{e:g}" for e in sz.epsilons], list(sz.epsilons),
              "target epsilon (delta = 1/(10 N))", "final eval loss", out / "dp_clients.png")
    eps_loss_plot(asy, sz, out / "dp_async.png")
    cmd = "python experiments/privacy/dp.py" + (" --quick" if args.quick else "")
    (out / "dp.md").write_text(report(sz, scale, asy, out, minutes, cmd))
    (out / "dp.json").write_text(json.dumps({"|".join(k): v for k, v in {**scale, **{("async",) + k: v for k, v in asy.items()}}.items()}, indent=1))
    print(f"wrote {out / 'dp.md'} ({minutes:.1f} min) {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
