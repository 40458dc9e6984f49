"""Eval loss of a federated run with and without sample-level DP-SGD (Abadi et al., CCS 2016):
the demo config (SmolLM2-135M, 10 clients) as is, and with ``privacy.dp.mode=sample`` at the noise
multiplier sigma that keeps every client within (epsilon, delta) = (8, 1 / (n + 1)), n the client's
training examples.

sigma is calibrated per client with ``edgelam.privacy.accountant.calibrate_sigma`` (dp-accounting's
RDP accountant) for its Poisson rate q = batch_size * grad_accum / n and, as the worst case, a trip
in every round (fl.rounds x local steps), composing PoissonSampled(q, Gaussian(sigma)); the run uses
the largest. Both runs share the seed, so they differ only by DP-SGD (clipping and noise).

    .venv/bin/python benchmarks/dpsgd.py [--config configs/demo.yaml] [--epsilon 8] [--clip 1.0] \
        [--out runs/bench_dpsgd] [key=value ...]

Writes ``<out>/dpsgd.json`` (sigma, each client's q, steps, delta and epsilon, both runs' eval loss).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgelam.config import RunConfig
from edgelam.config_load import load_config
from edgelam.fl.client import num_local_steps
from edgelam.lifecycle import run
from edgelam.privacy.accountant import calibrate_sigma, epsilon
from edgelam.privacy.dpsgd import sample_rate
from edgelam.store import read_jsonl
from edgelam.tasks import setup_task


def client_plans(cfg: RunConfig) -> list[dict[str, Any]]:
    """Per client: examples n, rate q, worst-case steps (a trip every round) and delta 1 / (n + 1)."""
    sizes = [len(c.train) for c in setup_task(cfg).data.clients]  # the base model is cached for the runs
    expected = cfg.train.batch_size * cfg.train.grad_accum
    return [{"client": k, "n": n, "q": sample_rate(expected, n), "steps": cfg.fl.rounds * num_local_steps(cfg.train, n),
             "delta": 1.0 / (n + 1)} for k, n in enumerate(sizes)]


def calibrate(plans: list[dict[str, Any]], target_epsilon: float) -> float:
    """The smallest sigma that keeps every client within ``target_epsilon`` at its own delta."""
    def one(p: dict[str, Any]) -> float:
        return calibrate_sigma(lambda s: {(p["q"], s): p["steps"]}, target_epsilon, p["delta"])

    return max(one(p) for p in plans)


def eval_losses(folder: Path) -> dict[str, Any]:
    rows = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("eval_loss") is not None]
    return {"first_eval_loss": rows[0]["eval_loss"], "final_eval_loss": rows[-1]["eval_loss"],
            "dp_epsilon": rows[-1].get("dp_epsilon")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_dpsgd"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    plans = client_plans(cfg)
    sigma = calibrate(plans, args.epsilon)
    for p in plans:
        p["epsilon"] = epsilon({(p["q"], sigma): p["steps"]}, p["delta"])
    print(f"sigma = {sigma:.4f} (C = {args.clip}) for epsilon <= {args.epsilon} at delta = 1/(n+1)")
    for p in plans:
        print(f"  client {p['client']}: n {p['n']:4d}  q {p['q']:.4f}  steps {p['steps']:3d}  "
              f"delta {p['delta']:.2e}  epsilon {p['epsilon']:.3f}")

    dp_overrides = ["privacy.dp.mode=sample", f"privacy.dp.noise_multiplier={sigma!r}",
                    f"privacy.dp.clipping_norm={args.clip!r}",
                    f"privacy.dp.target_delta={1.0 / (min(p['n'] for p in plans) + 1)!r}"]
    results: dict[str, Any] = {"config": args.config, "epsilon": args.epsilon, "clipping_norm": args.clip,
                               "noise_multiplier": sigma, "clients": plans}
    for name, extra in (("no_dp", []), ("dpsgd", dp_overrides)):
        folder = args.out / name
        run(load_config(args.config, [*args.overrides, *extra]), folder)
        results[name] = eval_losses(folder)
        print(f"{name:6s}: eval loss {results[name]['first_eval_loss']:.4f} -> {results[name]['final_eval_loss']:.4f}"
              + ("" if results[name]["dp_epsilon"] is None else f"  (run's epsilon {results[name]['dp_epsilon']:.3f})"))
    if not results["dpsgd"]["dp_epsilon"]:  # None or 0: no DP-SGD step was recorded
        print("warning: the DP-SGD run spent no epsilon; is privacy.dp.mode=sample wired into the rounds?")
    (args.out / "dpsgd.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
