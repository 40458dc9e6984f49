"""Federated unlearning on the tiny model: retraining from scratch, rollback + retraining, FedEraser
and retraining one resource cluster, side by side (``privacy/unlearn.py``).

    .venv/bin/python experiments/unlearning/run.py            # results.md and methods.png here
    .venv/bin/python experiments/unlearning/run.py --quick    # a smoke test: one seed per scenario (/tmp)

``configs/tiny_unlearn.yaml``: 4 clients in 2 resource clusters (rescluster), client 3 alone holds the
arithmetic task and memorises its sums; 3 rounds of 16 local steps. Two scenarios:

    joins in round 1   fl.fraction 1: every client trains every round; seeds 0, 1, 2
    joins in round 2   fl.fraction 0.75: the first seeds whose round 1 leaves client 3 out and whose
                       round 2 takes it (read from the strategy's selection, as the run draws it)

For each seed: the run, then ``unlearn(run, 3, ["all"])``, which retrains from scratch (the reference)
and runs the other three methods. Every number in results.md is computed by this script."""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgelam.config_load import load_config  # noqa: E402
from edgelam.fl.strategies import build_strategy  # noqa: E402
from edgelam.lifecycle import run  # noqa: E402
from edgelam.privacy.unlearn import unlearn  # noqa: E402
from edgelam.store import Purpose, rng_for  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = ROOT / "configs" / "tiny_unlearn.yaml"
K = 3
METHODS = ("retrain", "rollback", "federaser", "cluster")
ROWS = ("original", *METHODS)
SCENARIOS = {"joins in round 1": ["fl.fraction=1.0"], "joins in round 2": ["fl.fraction=0.75"]}
METRICS = ("forget_loss", "gap", "mia_auc", "utility_loss", "sim_time_s", "bytes", "energy_j")


def first_round(overrides: list[str], seed: int) -> int | None:
    """The round client K is first selected in, from the strategy's own draws (None: never)."""
    cfg = load_config(CONFIG, [*overrides, f"seed={seed}"])
    strategy, n = build_strategy(cfg), cfg.data.num_clients
    return next((r for r in range(1, cfg.fl.rounds + 1) if K in strategy.select(r, n, rng_for(seed, Purpose.SELECT, r))),
                None)


def seeds_for(scenario: str, count: int) -> list[int]:
    want = 1 if scenario.endswith("round 1") else 2
    found = (s for s in range(1000) if first_round(SCENARIOS[scenario], s) == want)
    return [next(found) for _ in range(count)]


def one(scenario: str, seed: int, tmp: Path) -> dict[str, dict[str, float]]:
    """Each row's metrics for one seed: loss on K, its gap to retraining, MIA AUC, others' loss, costs."""
    folder = tmp / f"{scenario.replace(' ', '_')}-{seed}"
    run(load_config(CONFIG, [*SCENARIOS[scenario], f"seed={seed}"]), folder / "run")
    report = unlearn(folder / "run", K, ["all"], folder / "unlearn")
    ref = report["methods"]["retrain"]["forget_loss"]
    members, nonmembers = report["original"]["mia_examples"]
    out = {"original": {**report["original"], "gap": report["original"]["forget_loss"] - ref, "members": members,
                        "nonmembers": nonmembers}}
    for m in METHODS:
        r = report["methods"][m]
        c = r["cost"]
        out[m] = {**r, "gap": r["forget_loss"] - ref, **{k: r["cost_vs_reference"][k] for k in ("sim_time_s", "bytes", "energy_j")},
                  "abs_sim_time_s": c["sim_time_s"], "abs_bytes": c["bytes_up"] + c["bytes_down"], "abs_energy_j": c["energy_j"]}
    return out


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(res: dict[tuple[str, str], list[float]]) -> list[str]:
    lines = ["| method | loss on client 3's training data | minus retraining's | MIA AUC | others' held-out loss | "
             "sim time / retraining | bytes / retraining | energy / retraining |", "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        cells = [fmt(res[(row, m)], 2 if m in ("sim_time_s", "bytes", "energy_j") else 3) for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def plot(all_res: dict[str, dict[tuple[str, str], list[float]]], path: Path) -> None:
    panels = [("forget_loss", "loss on client 3's training data"), ("mia_auc", "membership-inference AUC on client 3"),
              ("utility_loss", "other clients' held-out loss"), ("sim_time_s", "simulated time / retraining")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    width = 0.8 / len(all_res)
    for ax, (metric, title) in zip(axes, panels):
        rows = [r for r in ROWS if metric != "sim_time_s" or r != "original"]
        for i, (scenario, res) in enumerate(all_res.items()):
            means = [statistics.mean(res[(r, metric)]) for r in rows]
            stds = [statistics.stdev(res[(r, metric)]) if len(res[(r, metric)]) > 1 else 0.0 for r in rows]
            ax.bar([x + i * width for x in range(len(rows))], means, width, yerr=stds, capsize=3, label=f"client 3 {scenario}")
        ax.set_xticks([x + width * (len(all_res) - 1) / 2 for x in range(len(rows))], rows, rotation=20)
        ax.set_title(title, fontsize=10)
        if metric == "mia_auc":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
            ax.set_ylim(0.3, 1.0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    return f"{name or platform.machine()}, 1 torch thread (threads: 1 in the config)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one seed per scenario, results in /tmp")
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="unlearning-")) if args.quick else HERE
    t0 = time.time()
    all_res: dict[str, dict[tuple[str, str], list[float]]] = {}
    seeds: dict[str, list[int]] = {}
    retrain_cost: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            seeds[scenario] = seeds_for(scenario, 1 if args.quick else 3)
            res: dict[tuple[str, str], list[float]] = defaultdict(list)
            cost: dict[str, list[float]] = defaultdict(list)
            for seed in seeds[scenario]:
                got = one(scenario, seed, Path(tmp))
                for row, vals in got.items():
                    for m in (*METRICS, "members", "nonmembers"):
                        if vals.get(m) is not None:
                            res[(row, m)].append(float(vals[m]))
                for k in ("abs_sim_time_s", "abs_bytes", "abs_energy_j"):
                    cost[k].append(got["retrain"][k])
                print(f"{scenario}, seed {seed}: done ({time.time() - t0:.0f} s)", flush=True)
            all_res[scenario], retrain_cost[scenario] = res, cost
    plot(all_res, out_dir / "methods.png")
    write_results(out_dir / "results.md", all_res, seeds, retrain_cost, time.time() - t0, args.quick)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'methods.png'}")


def write_results(path: Path, all_res: dict[str, Any], seeds: dict[str, list[int]], retrain_cost: dict[str, Any],
                  wall_s: float, quick: bool) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Federated unlearning: four methods side by side", "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Command: `.venv/bin/python experiments/unlearning/run.py{' --quick' if quick else ''}` (from the repository "
        f"root, git {rev or 'unknown'} plus the working tree)",
        f"- Wall time: {wall_s / 60:.1f} min",
        "- Seeds: " + "; ".join(f"{s}: {v}" for s, v in seeds.items()) + " (mean ± std over seeds)", "",
        "`configs/tiny_unlearn.yaml`: the tiny-varied model (random 4-layer Llama), LoRA r = 4 on q, v and the MLP; "
        "4 clients in 2 clusters fixed by device resources (`rescluster`); clients 0 and 1 hold `reverse`, client 2 "
        "`uppercase`, client 3 alone holds `arithmetic` (20 training sums it cannot compute, so it memorises them; 20 "
        "held out); 3 rounds x 16 local steps. Client 3 is unlearned with `edgelam unlearn RUN --client 3 --method all`.", "",
        "Columns: the loss on client 3's training data (token-averaged) and its difference to retraining from scratch "
        "(the model that never saw it: 0 is exact); the AUC of a loss-threshold membership-inference attack "
        "(Yeom et al. 2018) with client 3's training examples as members and its held-out plus the global "
        "arithmetic evaluation examples as non-members (0.5: no leakage); the loss on the other clients' held-out "
        "data (utility); and the network cost of unlearning (simulated time, radio bytes up + down, device energy) "
        "as a fraction of retraining from scratch.", "",
    ]
    for scenario, res in all_res.items():
        c = retrain_cost[scenario]
        lines += [f"## Client 3 {scenario}", "", *table(res), "",
                  f"Retraining from scratch cost {fmt(c['abs_sim_time_s'], 2)} s of simulated time, "
                  f"{fmt([b / 1e6 for b in c['abs_bytes']], 3)} MB and {fmt(c['abs_energy_j'], 2)} J.", ""]
    lines += ["![methods](methods.png)", "", *findings(all_res), ""]
    path.write_text("\n".join(lines))


def findings(all_res: dict[str, Any]) -> list[str]:
    """What the tables show, with their numbers."""
    one, two = all_res["joins in round 1"], all_res["joins in round 2"]

    def m(res: Any, row: str, metric: str, digits: int = 2) -> str:
        return fmt(res[(row, metric)], digits)

    # the AUC's standard deviation when nothing leaks (Hanley & McNeil 1982, equal variances): n1 members, n0 non-members
    n1, n0 = int(one[("original", "members")][0]), int(one[("original", "nonmembers")][0])
    null_sd = ((n1 + n0 + 1) / (12 * n1 * n0)) ** 0.5
    slowest = max(one[("cluster", "sim_time_s")] + two[("cluster", "sim_time_s")])
    return [
        "## What it shows", "",
        f"- **The attack sees the memorising client, and nothing after retraining.** Before unlearning the "
        f"loss-threshold attack tells client 3's training sums from unseen ones with AUC {m(one, 'original', 'mia_auc')} "
        f"(joins in round 1) and {m(two, 'original', 'mia_auc')} (round 2); after retraining from scratch "
        f"{m(one, 'retrain', 'mia_auc')} and {m(two, 'retrain', 'mia_auc')}. With {n1} members and {n0} non-members "
        f"the AUC of a model that never saw them has a standard deviation of about {null_sd:.3f}, so these are chance.",
        f"- **Rollback is retraining, for less.** Its adapters and every metric equal retraining's bit for bit "
        f"(`tests/test_unlearn.py` checks it); it skips the rounds before the client's first: nothing saved when "
        f"it took part from round 1, {m(two, 'rollback', 'sim_time_s')} of the simulated time and "
        f"{m(two, 'rollback', 'energy_j')} of the energy when it joined in round 2. The price is a checkpoint per "
        f"round on the server.",
        f"- **FedEraser is approximate.** Its loss on client 3's data differs from retraining's by "
        f"{m(one, 'federaser', 'gap')} (round 1) and {m(two, 'federaser', 'gap')} (round 2), the "
        f"attack is at chance ({m(one, 'federaser', 'mia_auc')}, {m(two, 'federaser', 'mia_auc')}), and the other "
        f"clients pay some utility (held-out loss {m(one, 'federaser', 'utility_loss')} against retraining's "
        f"{m(one, 'retrain', 'utility_loss')}). It moves as many bytes as the rounds it replays (every calibration "
        f"round downloads and uploads the adapter); it saves compute (half the local steps): "
        f"{m(one, 'federaser', 'sim_time_s')} of the simulated time and {m(one, 'federaser', 'energy_j')} of the "
        f"energy from round 1, {m(two, 'federaser', 'sim_time_s')} and {m(two, 'federaser', 'energy_j')} from round 2 "
        f"(where it also starts from the kept checkpoint). The server must keep every client's update of every round.",
        f"- **Retraining one cluster gives retraining's adapter for that cluster** (the other clusters are kept bit "
        f"for bit; the retrained one equals full retraining's because no other cluster touches it) for "
        f"{m(one, 'cluster', 'bytes')} and {m(two, 'cluster', 'bytes')} of the bytes. Its simulated time varies "
        f"most ({m(one, 'cluster', 'sim_time_s')}): a round lasts as long as its slowest device, and a smaller cohort "
        f"draws different fading for the devices that remain (`net/topology.draw_links` draws in order over the "
        f"scheduled devices), so a cluster's retraining can even take longer than full retraining (the largest "
        f"ratio over the seeds: {slowest:.2f}).",
    ]


if __name__ == "__main__":
    main()
