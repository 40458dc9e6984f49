"""Do clustered strategies recover the propagation environments? Channel prediction (CDL-A..E, TDD,
tiny backbone) on 10 clients, two per CDL profile: FedAvg against IFCA with 2 and 5 clusters and
CFL; the final cluster assignment is compared with the clients' profiles (and with LOS vs NLOS:
CDL-D and E have a line of sight, A-C do not) by the adjusted Rand index (1: the same grouping,
0: no better than chance).

    .venv/bin/python experiments/air_interface/clustering.py            # clustering.md here
    .venv/bin/python experiments/air_interface/clustering.py --quick    # smoke test (/tmp)
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from math import comb
from pathlib import Path

import torch
from common import THREADS, git_rev, lam_run, machine, results, table

HERE = Path(__file__).resolve().parent
PROFILES = ("A", "B", "C", "D", "E")
CLIENTS = 10  # client k holds profile k % 5
SCHEMES = {"FedAvg": ["fl.strategy=fedavg"],
           "IFCA, 2 clusters": ["fl.strategy=ifca", "fl.cluster.num_clusters=2"],
           "IFCA, 5 clusters": ["fl.strategy=ifca", "fl.cluster.num_clusters=5"],
           "CFL": ["fl.strategy=cfl"]}


def adjusted_rand(a: list[str], b: list[str]) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings of the same items."""
    pairs = {(x, y): 0 for x in a for y in b}
    for x, y in zip(a, b):
        pairs[(x, y)] += 1
    index = sum(comb(n, 2) for n in pairs.values())
    rows = sum(comb(a.count(x), 2) for x in set(a))
    cols = sum(comb(b.count(y), 2) for y in set(b))
    expected = rows * cols / comb(len(a), 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, written to /tmp")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    seeds, rounds, steps, users = ((0,), 2, 2, 4) if args.quick else ((0, 1, 2), 15, 20, 32)
    out = Path(tempfile.gettempdir()) / "clustering_quick" if args.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    t0, res = time.perf_counter(), results()
    profile = [f"CDL-{PROFILES[k % len(PROFILES)]}" for k in range(CLIENTS)]
    los = ["LOS" if p in ("CDL-D", "CDL-E") else "NLOS" for p in profile]
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in SCHEMES.items():
                over = [f"seed={seed}", "threads=2", f"channels.profiles=[{','.join(PROFILES)}]",
                        f"data.num_clients={CLIENTS}", "channels.speed_kmh=[10,120]", "channels.bs_rows=2",
                        "channels.bs_cols=2", f"channels.users_per_client={users}", "channels.eval_users=16",
                        f"fl.rounds={rounds}", f"train.local_steps={steps}", "train.lr=0.003", f"eval.every={rounds}",
                        *extra]
                folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
                _, summary = lam_run("tiny_channel.yaml", over, folder)
                res[("main", name, "nmse")].append(summary["final_eval_nmse_db"])
                last = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()][-1]
                groups = last.get("assignment") or ["global"] * CLIENTS
                res[("main", name, "clusters")].append(len(set(groups)))
                res[("main", name, "ari_profile")].append(adjusted_rand(groups, profile))
                res[("main", name, "ari_los")].append(adjusted_rand(groups, los))
        print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = shlex.join([".venv/bin/python", "experiments/air_interface/clustering.py", *sys.argv[1:]])
    cols = ["nmse", "clusters", "ari_profile", "ari_los"]
    lines = ["# Do clustered strategies recover the propagation environments?", "",
             f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- Command: `{cmd}` (from the repository root, git {git_rev()})",
             f"- Wall time: {(time.perf_counter() - t0) / 60:.1f} min", f"- Seeds: {list(seeds)} (mean ± std)", "",
             (f"Channel prediction, `configs/tiny_channel.yaml`: {CLIENTS} clients, client k on CDL profile "
              f"{'/'.join(PROFILES)}[k % 5] (two per profile), 8 BS antennas, {users} users per client, 10-120 km/h, "
              f"{rounds} rounds x {steps} local steps, lr 0.003, tiny backbone. NMSE at the held-out users of every "
              "profile (each profile's users scored with the adapter of the clients on that profile). Adjusted Rand "
              "index of the final assignment against the clients' profiles and against LOS (D, E) / NLOS (A-C): 1 is "
              "the same grouping, 0 chance; FedAvg's single model scores 0."), "",
             *table(res, "main", list(SCHEMES), cols,
                    ["scheme", "NMSE (dB)", "clusters", "ARI vs profile", "ARI vs LOS / NLOS"], 2), ""]
    (out / "clustering.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'clustering.md'}")


if __name__ == "__main__":
    main()
