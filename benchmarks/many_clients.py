"""Peak memory against the number of simulated clients on one base model (configs/many_clients.yaml).

Each point is a real run in its own process (``edgelam.lifecycle.run``), so its peak resident memory
(``ru_maxrss``) is its own: SmolLM2-135M with LoRA r = 8 on q/v and 10, 100 and 1,000 clients of
Dolly-15k (10 of them training per round, 5 per forward), then the tiny model with 10,000 clients of
the synthetic set (iid). A client's state between trips is its data (token ids) and its seeds; no
model copy, no optimizer state (each trip starts a fresh AdamW, as FedAvg's clients do).

    .venv/bin/python benchmarks/many_clients.py                          # the recorded points
    .venv/bin/python benchmarks/many_clients.py --points smollm2:10 tiny:1000 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POINTS = ("smollm2:10", "smollm2:100", "smollm2:1000", "smollm2-async:1000", "tiny:10000")

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
from edgelam.config_load import load_config
from edgelam.lifecycle import run
t0 = time.perf_counter()
cfg = load_config(sys.argv[1], sys.argv[2:])
with tempfile.TemporaryDirectory() as d:
    summary = run(cfg, Path(d) / "run")
    rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
print("RESULT " + json.dumps({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
    "round_wall_s": [r["wall_s"] for r in rows], "trips": sum(len(r["clients"]) for r in rows),
    "clients": cfg.data.num_clients, "final_eval_loss": summary.get("final_eval_loss")}))
"""


def overrides(point: str, rounds: int, threads: int) -> list[str]:
    model, n = point.split(":")
    n_clients = int(n)
    out = [f"data.num_clients={n_clients}", f"fl.fraction={min(1.0, 10 / n_clients)}", f"fl.rounds={rounds}",
           f"threads={threads}", f"eval.every={rounds}"]
    if model == "smollm2-async":  # async arrivals choose who trains: FedBuff over the 1 % active devices, K = 5
        out += ["fl.strategy=fedbuff", "fl.asynchronous.buffer_size=5"]
    if model == "tiny":  # 10,000 clients of the synthetic set, 4 examples each
        out += ["model.name=tiny", "data.source=synthetic", "data.partition=iid", "data.tasks=[arithmetic,reverse,capital]",
                f"data.examples_per_task={n_clients * 4 // 3 + 1}", "data.max_examples_per_client=4", "data.max_length=64"]
    return out


def one_point(point: str, rounds: int, threads: int) -> dict[str, Any]:
    args = overrides(point, rounds, threads)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "configs" / "many_clients.yaml"), *args],
                          capture_output=True, text=True, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{point} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"point": point, "overrides": args, **json.loads(lines[-1][len("RESULT "):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=list(POINTS), help="MODEL:CLIENTS (smollm2, smollm2-async, tiny)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "many_clients.json")
    args = ap.parse_args()
    results = []
    for p in args.points:
        res = one_point(p, args.rounds, args.threads)
        print(f"{p:>20}  peak {res['peak_rss_mb']:8.0f} MB  wall {res['wall_s']:7.1f} s  trips {res['trips']}", flush=True)
        results.append(res)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
              "results": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
