"""A device draft worth its round trip (issue 15): EdgeLAM trains the early-exit draft, then it is timed.

1. Train: ``configs/draft_smollm2.yaml`` (task draft_distill: SmolLM2-135M's first 8 of 30 blocks, LoRA
   on them and a copy of the final norm, distilled from the full model, FedAvg over 3 Dolly clients).
2. Serve: the full model in an ``edgelam serve`` process (the edge) behind an emulated link (RTT, 100
   Mbit/s: ``benchmarks/inference.py``'s transport shaping), the draft (``full:8``) in this process (the
   device), trained (the run's adapter) or untrained (the bare early exit).
3. Measure on held-out prompts (Dolly's ``global_test.json``, never trained on; the ones the run's
   evaluation read are skipped too), greedy, stopping at EOS: upstream-only decoding (no draft) and
   speculative decoding (adaptive draft length, at most 8) with each draft in the same pass, at RTT 0, 5,
   20, 50, 100 ms: acceptance, tokens per verification round, speed-up, and the RTT from which drafting
   pays. Every speculative answer is checked token-identical to upstream-only greedy decoding.

    .venv/bin/python experiments/draft/run.py                          # train into runs/draft_smollm2, measure
    .venv/bin/python experiments/draft/run.py --run runs/draft_smollm2 # measure the adapter of an earlier run
    .venv/bin/python experiments/draft/run.py --quick             # a smoke test on tiny-varied (/tmp)

Every number in results.md is computed by this script from the runs it makes."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "experiments" / "air_interface"))
from common import git_rev, machine  # noqa: E402
from inference import per_token, summarize  # noqa: E402  (benchmarks/inference.py)

from edgelam.config_load import load_config  # noqa: E402
from edgelam.data.build import build_federated_data, resolve_auto  # noqa: E402
from edgelam.data.format import IGNORE  # noqa: E402
from edgelam.infer.client import HttpTransport, LinkShaper, Transport  # noqa: E402
from edgelam.infer.speculative import AdaptiveGamma, SpecStats, Speculative  # noqa: E402
from edgelam.infer.topology import device_draft, start_service, wait_ready  # noqa: E402
from edgelam.lifecycle import run  # noqa: E402
from edgelam.models.load import load_base  # noqa: E402
from edgelam.tasks.draft import prompt_of  # noqa: E402

RTTS_MS = (0, 5, 20, 50, 100)
RATE_BPS = 100e6


def held_out_prompts(config: Path, per_task: int) -> list[list[int]]:
    """``per_task`` prompts per data task from the global evaluation set, after the ones the run's
    evaluation read (eval.max_per_task), whose prompt and answer fit data.max_length."""
    cfg = load_config(config)
    tok = load_base(cfg.model.name, cfg.model.dtype, 0).tokenizer
    data = build_federated_data(resolve_auto(cfg.data)[0], tok, cfg.seed)
    skip = cfg.eval.max_per_task or 0
    out = []
    for samples in data.global_eval.values():
        whole = [s for s in samples[skip:] if any(lab != IGNORE for lab in s.labels)]  # prompt not truncated
        out += [prompt_of(s) for s in whole[:per_task]]
    return out


FIXED_GAMMA = 4  # the draft's quality apart from timing: every round drafts 4 tokens


def generate(draft: Transport, target: Transport, ids: list[int], n: int, eos: int | None, gamma: int | None) -> SpecStats:
    """Greedy decoding of ``ids``: gamma 0 upstream only, None the adaptive draft length, else that many drafts."""
    ctrl = AdaptiveGamma(gamma_max=8) if gamma is None else AdaptiveGamma(fixed=gamma)
    return Speculative(draft, target, ctrl).generate(ids, n, eos)


def fixed_gamma(drafts: dict[str, Transport], up: Transport, prompts: list[list[int]], n: int,
                eos: int | None) -> dict[str, Any]:
    """Per draft, acceptance and tokens per round at a fixed draft length (no timing in it), median and spread."""
    out: dict[str, Any] = {}
    for name, draft in drafts.items():
        samples = []
        for ids in prompts:
            plain, spec = generate(draft, up, ids, n, eos, 0), generate(draft, up, ids, n, eos, FIXED_GAMMA)
            if spec.tokens != plain.tokens:
                raise AssertionError(f"speculative decoding with the {name} draft changed the answer")
            samples.append({"acceptance": spec.acceptance, "tokens_per_round": len(spec.tokens) / spec.rounds})
        out[name] = summarize(samples)
    return out


def cell(drafts: dict[str, Transport], up: Transport, ids: list[int], n: int, eos: int | None) -> dict[str, Any]:
    """One prompt at one RTT: upstream-only decoding, then speculative decoding with each draft."""
    plain = generate(next(iter(drafts.values())), up, ids, n, eos, 0)
    out: dict[str, Any] = {"upstream_only_per_token_ms": per_token(plain) * 1e3}
    for name, draft in drafts.items():
        spec = generate(draft, up, ids, n, eos, None)
        if spec.tokens != plain.tokens:
            raise AssertionError(f"speculative decoding with the {name} draft changed the answer")
        out[name] = {"speculative_per_token_ms": per_token(spec) * 1e3, "speedup": per_token(plain) / per_token(spec),
                     "acceptance": spec.acceptance, "tokens_per_round": len(spec.tokens) / spec.rounds,
                     "mean_gamma": sum(spec.gammas) / len(spec.gammas)}
    return out


def breakeven_ms(rtts: list[float], speedups: list[float]) -> float | str:
    """The RTT from which drafting pays: the first crossing of speed-up 1, linearly interpolated."""
    if all(s >= 1 for s in speedups):
        return "pays at every RTT measured"
    for (r0, s0), (r1, s1) in zip(zip(rtts, speedups), zip(rtts[1:], speedups[1:])):
        if s0 < 1 <= s1:
            return r0 + (1 - s0) * (r1 - r0) / (s1 - s0)
    return f"does not pay up to {rtts[-1]:g} ms"


def measure(model: str, adapter: Path, k: int, prompts: list[list[int]], n: int, repeats: int) -> dict[str, Any]:
    target = start_service(model, "full", "edge")
    try:
        wait_ready([target], timeout_s=600)
        drafts = {"untrained": device_draft(model, f"full:{k}"), "trained": device_draft(model, f"full:{k}", str(adapter))}
        eos = load_base(model, "float32", 0).tokenizer.eos_token_id
        fixed = fixed_gamma(drafts, HttpTransport(target.url, "edge"), prompts, n, eos)
        print(f"fixed draft length {FIXED_GAMMA}:", json.dumps(fixed), flush=True)
        rows: dict[int, list[dict[str, Any]]] = {}
        for rtt in RTTS_MS:
            up = HttpTransport(target.url, "edge", LinkShaper(rtt / 1e3, RATE_BPS) if rtt else None)
            rows[rtt] = [cell(drafts, up, ids, n, eos) for _ in range(repeats) for ids in prompts]
            print(f"RTT {rtt} ms:", json.dumps(summary_at(rows[rtt])), flush=True)
    finally:
        target.kill()
    return {"samples": {str(r): v for r, v in rows.items()}, "summary": {str(r): summary_at(v) for r, v in rows.items()},
            "fixed_gamma": fixed}


def summary_at(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min / max over prompts (and repeats) at one RTT."""
    out: dict[str, Any] = summarize([{"upstream_only_per_token_ms": s["upstream_only_per_token_ms"]} for s in samples])
    for name in ("untrained", "trained"):
        out[name] = summarize([s[name] for s in samples])
    return out


def spread(s: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s[key])} ({fmt.format(s[key + '_min'])}-{fmt.format(s[key + '_max'])})"


def write_results(out: Path, res: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    summ, tr = res["measure"]["summary"], res["training"]
    head = "| draft | " + " | ".join(f"RTT {r} ms" for r in RTTS_MS) + " | pays from RTT |"
    lines = [
        "# A device draft trained by EdgeLAM: speculative decoding on SmolLM2-135M" if res["model"] == "smollm2"
        else f"# A device draft trained by EdgeLAM ({res['model']}, smoke test)", "",
        f"- Machine: {res['machine']}; load average before / after: {res['load_before']} / {res['load_after']}",
        f"- Date: {res['date']}", f"- Command: `{res['command']}` (from the repository root, git {res['git']})",
        f"- Wall time: training {tr['wall_s'] / 60:.1f} min, measurement {res['measure_wall_s'] / 60:.1f} min",
        f"- Held-out prompts: {res['prompts']} ({res['per_task']} per data task, i.e. Dolly category, after the ones the run evaluated on), "
        f"{res['repeats']} repeat(s); up to {res['new_tokens']} new tokens, greedy, stopping at EOS; every speculative "
        "answer checked token-identical to upstream-only greedy decoding", "",
        f"Training (`{res['config']}`): {tr['rounds']} rounds, {tr['clients']} clients; teacher-forced top-1 agreement of "
        f"the draft with the full model on the held-out evaluation {tr['first_agreement']:.3f} -> {tr['final_agreement']:.3f}, "
        f"KL {tr['first_kl']:.2f} -> {tr['final_kl']:.2f} nats per token; {tr['bytes_up'] / 1e6:.1f} MB up, "
        f"simulated time {tr['sim_time_s']:.0f} s.", "",
        "Speed-up of speculative decoding over upstream-only decoding at the same RTT (median, min-max over prompts):", "",
        head, "|---" * (len(RTTS_MS) + 2) + "|",
        "| upstream only (ms per token) | " + " | ".join(spread(summ[str(r)], "upstream_only_per_token_ms", "{:.0f}")
                                                     for r in RTTS_MS) + " | - |"]
    for name in ("untrained", "trained"):
        cells = [spread(summ[str(r)][name], "speedup") + "x" for r in RTTS_MS]
        be = res["breakeven_ms"][name]
        lines.append(f"| {name} first {res['k']} blocks | " + " | ".join(cells) + " | "
                     + (f"~{be:.0f} ms" if isinstance(be, float) else be) + " |")
    fixed = res["measure"]["fixed_gamma"]
    lines += ["", f"The drafts themselves, at a fixed draft length of {FIXED_GAMMA} (no timing involved; median, min-max "
              "over prompts):", "", "| draft | acceptance | tokens per verification round |", "|---|---|---|"]
    lines += [f"| {name} first {res['k']} blocks | {spread(fixed[name], 'acceptance')} | "
              f"{spread(fixed[name], 'tokens_per_round')} |" for name in ("untrained", "trained")]
    lines += ["", "As served, with the adaptive draft length: acceptance (drafted tokens the target accepted) and tokens "
              "per verification round (median, min-max):", "",
              head.replace(" pays from RTT |", "").replace("| draft |", "| draft, figure |"), "|---" * (len(RTTS_MS) + 1) + "|"]
    for name in ("untrained", "trained"):
        for key, label in (("acceptance", "acceptance"), ("tokens_per_round", "tokens / round")):
            lines.append(f"| {name}, {label} | " + " | ".join(spread(summ[str(r)][name], key) for r in RTTS_MS) + " |")
    lines += ["", "The adaptive draft length drafts less where drafting does not pay, so acceptance is measured on "
              "different positions at each RTT.", ""]
    (out / "results.md").write_text("\n".join(lines))


def training_summary(folder: Path, summary: dict[str, Any], clients: int) -> dict[str, Any]:
    """What the run's metrics say: round 0 (the untrained draft) and the final round."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"rounds": summary["rounds"], "clients": clients,
            "first_agreement": rows[0]["eval_agreement"], "final_agreement": rows[-1]["eval_agreement"],
            "first_kl": rows[0]["eval_loss"], "final_kl": rows[-1]["eval_loss"], "bytes_up": summary["bytes_up_total"],
            "sim_time_s": summary["sim_time_s"], "wall_s": summary["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing draft_distill run folder: measure it, do not train")
    ap.add_argument("--per-task", type=int, default=1, help="held-out prompts per data task (Dolly: 8 categories)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (fewer when EOS comes first)")
    ap.add_argument("--quick", action="store_true", help="tiny-varied, configs/tiny_draft.yaml; results in /tmp")
    args = ap.parse_args()
    torch.set_num_threads(2)
    config = ROOT / "configs" / ("tiny_draft.yaml" if args.quick else "draft_smollm2.yaml")
    out = Path(tempfile.mkdtemp(prefix="draft-exp-")) if args.quick else HERE
    load_before = os.getloadavg()[0]
    folder = args.run or (out / "run" if args.quick else ROOT / "runs" / "draft_smollm2")
    if args.run is None:
        summary = run(load_config(config), folder)
        torch.set_num_threads(2)
    else:
        summary = json.loads((folder / "summary.json").read_text())
    cfg = load_config(folder / "config.yaml")
    assert cfg.draft.exit_layer is not None
    prompts = held_out_prompts(config, args.per_task)
    t0 = time.perf_counter()
    measured = measure(cfg.model.name, folder / "adapter", cfg.draft.exit_layer, prompts, args.tokens, args.repeats)
    rtts = [float(r) for r in RTTS_MS]
    res = {"model": cfg.model.name, "k": cfg.draft.exit_layer, "config": str(config.relative_to(ROOT)),
           "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"), "git": git_rev(),
           "command": shlex.join([".venv/bin/python", "experiments/draft/run.py", *sys.argv[1:]]),
           "load_before": f"{load_before:.2f}", "load_after": f"{os.getloadavg()[0]:.2f}",
           "prompts": len(prompts), "per_task": args.per_task, "repeats": args.repeats, "new_tokens": args.tokens,
           "training": training_summary(folder, summary, cfg.data.num_clients), "measure_wall_s": time.perf_counter() - t0, "measure": measured,
           "breakeven_ms": {name: breakeven_ms(rtts, [measured["summary"][str(r)][name]["speedup"] for r in RTTS_MS])
                            for name in ("untrained", "trained")}}
    write_results(out, res)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.md'}")


if __name__ == "__main__":
    main()
