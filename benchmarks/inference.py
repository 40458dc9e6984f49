"""Collaborative inference on real processes: latency of each topology against the physics.

Measured in one run, side by side, on the bundled SmolLM2-135M-Instruct (greedy, same prompt):

1. per-hop software overhead on loopback: one decode call (1 token, one block) to a module service
   over HTTP against the same call in process (median of many);
2. time to first token (TTFT) and per-token latency of: single process; a pipeline over 2 and 3
   block services, the device relaying every stage or the first stage pushing to the next
   server to server (``infer/push.py``); each also behind emulated links (device RTT 10 ms at
   100 Mbit/s, server backhaul RTT 1 ms at 1 Gbit/s), next to the physical floor: the
   single-process compute + per one-way hop (RTT / 2 + bytes / rate);
3. speculative decoding with the draft on the device (the first K blocks + LM head) and the target
   at the edge behind RTT 0, 5, 20, 50, 100 ms, against upstream-only decoding at the same RTT:
   acceptance rate, per-token latency, speed-up, and the RTT where drafting stops paying.

Every "node" is a process on this machine (2 CPU cores): compute figures are this CPU's.
``--repeats`` applies to the hop-overhead microbenchmark (1.) only. Each pipeline and speculative
cell (2., 3.) is one generation unless ``--cell-repeats N`` repeats it: then each figure is the
median of N runs and ``<figure>_min`` / ``<figure>_max`` give the spread.

    .venv/bin/python benchmarks/inference.py --tokens 24 --out benchmarks/inference.png
    .venv/bin/python benchmarks/inference.py --tokens 24 --cell-repeats 5 --out benchmarks/inference_r5.png

Services get ``OMP_WAIT_POLICY=PASSIVE`` (``infer/threads.py``) and so does this process (set
below, before torch is imported): idle OpenMP workers of one stage must not spin on the cores
the next stage needs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from edgelam.infer.threads import passive_threads

passive_threads()  # before torch is imported (infer/threads.py)
import torch  # noqa: E402

from edgelam.infer.client import HttpTransport, LinkShaper, LocalTransport, Stage  # noqa: E402
from edgelam.infer.modules import ModuleHost, ModuleSpec  # noqa: E402
from edgelam.infer.pipeline import Generation, Pipeline, prompt_ids  # noqa: E402
from edgelam.infer.push import Hop, PushChain  # noqa: E402
from edgelam.infer.speculative import AdaptiveGamma, SpecStats, Speculative  # noqa: E402
from edgelam.infer.topology import start_service, wait_ready  # noqa: E402
from edgelam.models.load import load_base  # noqa: E402

BACKHAUL = (1.0, 1000.0)  # server-to-server link of the pushed rows: RTT ms, Mbit/s

PROMPT = "Explain in two sentences why the sky is blue."


def hop_overhead(model: str, repeats: int) -> dict[str, float]:
    svc = start_service(model, "blocks:0:1", "loopback")
    try:
        wait_ready([svc])
        local = LocalTransport(ModuleHost(model, ModuleSpec("blocks", 0, 1)))
        remote = HttpTransport(svc.url, "loopback")
        hidden = torch.randn(1, 1, local.host.hidden_size)
        times: dict[str, list[float]] = {"local": [], "http": []}
        for tr_name, tr in (("local", local), ("http", remote)):
            tr.call({"hidden": torch.randn(1, 8, local.host.hidden_size)}, {"session": tr_name, "position": 0})
        for i in range(repeats):
            for tr_name, tr in (("http", remote), ("local", local)):
                t = time.perf_counter()
                tr.call({"hidden": hidden}, {"session": tr_name, "position": 8 + i})
                times[tr_name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"local_ms": med["local"] * 1e3, "http_ms": med["http"] * 1e3, "overhead_ms": (med["http"] - med["local"]) * 1e3}
    finally:
        svc.kill()


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per key: the median of the samples, and ``<key>_min`` / ``<key>_max`` (the spread)."""
    out: dict[str, float] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out |= {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
    return out


def run_pipeline(model: str, ranges: list[tuple[int, int]], urls: dict[tuple[int, int], str] | None, link: LinkShaper | None,
                 ids: list[int], n: int, backhaul: LinkShaper | None = None, push: bool = False) -> Generation:
    """One generation; ``push``: the first stage pushes to the next over ``backhaul`` (None: unshaped)."""
    local = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(model, spec))])  # noqa: E731
    blocks = [Stage(f"{a}:{b}", [HttpTransport(urls[(a, b)], f"{a}:{b}", link)]) if urls else local(ModuleSpec("blocks", a, b))
              for a, b in ranges]
    hop = lambda a, b: Hop(b.url, b.name, backhaul.rtt_s, backhaul.rate_bps) if backhaul else Hop(b.url, b.name)  # noqa: E731
    chain = PushChain(blocks, hop) if push else None
    gen = Pipeline(local(ModuleSpec("embed")), blocks, local(ModuleSpec("head")), chain=chain).generate(ids, n)
    assert not push or len(chain.hops) == n * (len(ranges) - 1), "the chain fell back to relaying"
    return gen


def per_token(st: SpecStats) -> float:
    return (st.token_times[-1] - st.token_times[0]) / (len(st.token_times) - 1)


def speculative_cell(draft: LocalTransport, up: HttpTransport, ids: list[int], n: int, reference: list[int]) -> dict[str, float]:
    """One run of upstream-only and speculative decoding at one RTT (the speed-up is per run)."""
    plain = Speculative(draft, up, AdaptiveGamma(fixed=0)).generate(ids, n)
    spec: SpecStats = Speculative(draft, up, AdaptiveGamma(gamma_max=8)).generate(ids, n)
    assert spec.tokens == plain.tokens == reference, "speculative decoding changed the answer"
    return {"upstream_only_per_token_ms": per_token(plain) * 1e3, "speculative_per_token_ms": per_token(spec) * 1e3,
            "speedup": per_token(plain) / per_token(spec), "acceptance": spec.acceptance,
            "mean_gamma": sum(spec.gammas) / len(spec.gammas), "ttft_ms": spec.token_times[0] * 1e3}


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--draft-blocks", default="20,28,30",
                    help="comma-separated K of the device draft full:K (K = all blocks: the target itself, an oracle draft)")
    ap.add_argument("--repeats", type=int, default=50, help="calls in the hop-overhead microbenchmark (median)")
    ap.add_argument("--cell-repeats", type=int, default=1,
                    help="generations per pipeline / speculative cell: median and min..max (default 1: a single run)")
    ap.add_argument("--no-speculative", action="store_true", help="measure the hop overhead and the pipelines only")
    ap.add_argument("--out", default="benchmarks/inference.png")
    args = ap.parse_args()
    if args.cell_repeats < 1:
        ap.error("--cell-repeats must be >= 1")
    base = load_base(args.model, "float32", 0)
    L = int(base.model.config.num_hidden_layers)
    hidden_bytes = int(base.model.config.hidden_size) * 4
    ids = prompt_ids(base.tokenizer, PROMPT)
    n = args.tokens
    res: dict[str, Any] = {"model": args.model, "prompt_tokens": len(ids), "new_tokens": n,
                           "threads": torch.get_num_threads(), "cell_repeats": args.cell_repeats}

    res["hop"] = hop_overhead(args.model, args.repeats)
    print("per-hop software overhead (loopback):", res["hop"])

    layouts = {"single process": [(0, L)], "pipeline 2 nodes": [(0, L // 2), (L // 2, L)],
               "pipeline 3 nodes": [(0, L // 3), (L // 3, 2 * L // 3), (2 * L // 3, L)]}
    services: dict[tuple[int, int], Any] = {}
    rows = []
    try:
        for ranges in list(layouts.values())[1:]:  # the last range first: each stage may push to the next one
            for k in range(len(ranges) - 1, -1, -1):
                if ranges[k] not in services:
                    nxt = [f"--push-to={services[ranges[k + 1]].url}"] if k + 1 < len(ranges) else []
                    services[ranges[k]] = start_service(args.model, "blocks:{}:{}".format(*ranges[k]), f"n{ranges[k][0]}",
                                                        extra=nxt)
        wait_ready(list(services.values()), timeout_s=600)
        urls = {r: s.url for r, s in services.items()}
        single = run_pipeline(args.model, [(0, L)], None, None, ids, n)
        reference = single.tokens
        compute_tok, compute_ttft = single.per_token_s, single.ttft_s
        for label, ranges in layouts.items():
            for (rtt_ms, rate_mbps), push in itertools.product(((0, None), (10, 100)), (False, True)):
                if label == "single process" and (rtt_ms or push):
                    continue
                link = LinkShaper(rtt_ms / 1e3, rate_mbps * 1e6) if rtt_ms else None
                backhaul = LinkShaper(BACKHAUL[0] / 1e3, BACKHAUL[1] * 1e6) if rtt_ms else None
                gens = [single] if label == "single process" else []
                while len(gens) < args.cell_repeats:
                    gens.append(run_pipeline(args.model, ranges, urls if label != "single process" else None, link, ids, n,
                                             backhaul, push))
                assert all(g.tokens == reference for g in gens), f"{label}: the answer differs from single-process greedy"
                stages = 0 if label == "single process" else len(ranges)
                # one-way hops per token: relayed, there and back per stage; pushed, there and back over the radio
                # once plus there and back on the backhaul per later stage
                radio, wired = (2 if stages else 0, 2 * (stages - 1)) if push else (2 * stages, 0)
                one_way = lambda ms, mbps, n_bytes: ms / 2e3 + (8 * n_bytes / (mbps * 1e6) if mbps else 0.0)  # noqa: E731
                back_ms, back_mbps = BACKHAUL if rtt_ms else (0, None)
                physical_tok = compute_tok + radio * one_way(rtt_ms, rate_mbps, hidden_bytes) + wired * one_way(
                    back_ms, back_mbps, hidden_bytes)
                physical_ttft = compute_ttft + radio * one_way(rtt_ms, rate_mbps, hidden_bytes * len(ids)) + wired * one_way(
                    back_ms, back_mbps, hidden_bytes * len(ids))
                link_text = "loopback" if not rtt_ms else f"RTT {rtt_ms} ms, {rate_mbps} Mbit/s" + (
                    f" (backhaul {BACKHAUL[0]:g} ms, {BACKHAUL[1]:g} Mbit/s)" if push else "")
                cells = [{"ttft_ms": g.ttft_s * 1e3, "per_token_ms": g.per_token_s * 1e3,
                          "vs_floor": g.per_token_s / physical_tok} for g in gens]
                rows.append({"topology": label + (", pushed" if push else (", relayed" if stages else "")),
                             "link": link_text, **summarize(cells),
                             "physical_per_token_ms": physical_tok * 1e3, "physical_ttft_ms": physical_ttft * 1e3})
                print(rows[-1])
    finally:
        for s in services.values():
            s.kill()
    res["pipeline"] = rows

    if args.no_speculative:
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
        plot(res, Path(args.out))
        return
    # speculative decoding: device draft (first K blocks + head) in process, target behind the link
    target = start_service(args.model, "full", "edge")
    spec_rows = []
    try:
        wait_ready([target], timeout_s=600)
        for k in [int(x) for x in args.draft_blocks.split(",")]:
            draft = LocalTransport(ModuleHost(args.model, ModuleSpec("full", 0, min(k, L))))
            for rtt_ms in (0, 5, 20, 50, 100):
                link = LinkShaper(rtt_ms / 1e3, 100e6) if rtt_ms else None
                up = HttpTransport(target.url, "edge", link)
                samples = [speculative_cell(draft, up, ids, n, reference) for _ in range(args.cell_repeats)]
                spec_rows.append({"draft_blocks": k, "rtt_ms": rtt_ms, **summarize(samples)})
                print(spec_rows[-1])
    finally:
        target.kill()
    res["speculative"] = spec_rows
    res["speculative_breakeven_rtt_ms"] = {}
    for k in sorted({r["draft_blocks"] for r in spec_rows}):
        rows_k = [r for r in spec_rows if r["draft_blocks"] == k]
        crossing = None
        for a, b in zip(rows_k, rows_k[1:]):
            if a["speedup"] < 1 <= b["speedup"]:
                crossing = a["rtt_ms"] + (1 - a["speedup"]) * (b["rtt_ms"] - a["rtt_ms"]) / (b["speedup"] - a["speedup"])
                break
        res["speculative_breakeven_rtt_ms"][k] = crossing if crossing is not None else (
            "pays at every RTT measured" if all(r["speedup"] >= 1 for r in rows_k) else "does not pay up to 100 ms")
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, Path(args.out))
    print(json.dumps(res, indent=1))


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = bool(res.get("speculative"))
    fig, axes = plt.subplots(1, 2 if spec else 1, figsize=(14 if spec else 9, 4.5), squeeze=False)
    a, b = axes[0][0], axes[0][-1]
    labels = [f"{r['topology']}\n{r['link']}" for r in res["pipeline"]]
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], [r["per_token_ms"] for r in res["pipeline"]], 0.4, label="measured")
    a.bar([i + 0.2 for i in x], [r["physical_per_token_ms"] for r in res["pipeline"]], 0.4, label="compute + transfer")
    a.set_xticks(list(x), labels, fontsize=7)
    a.set_ylabel("per-token latency (ms)")
    a.set_title(f"{res['model']}: pipelines (hop overhead {res['hop']['overhead_ms']:.2f} ms)")
    a.legend()
    if not spec:
        a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        return
    ks = sorted({r["draft_blocks"] for r in res["speculative"]})
    first = [r for r in res["speculative"] if r["draft_blocks"] == ks[0]]
    b.plot([r["rtt_ms"] for r in first], [r["upstream_only_per_token_ms"] for r in first], marker="o", color="k",
           label="upstream only")
    for k in ks:
        rows = [r for r in res["speculative"] if r["draft_blocks"] == k]
        acc = sum(r["acceptance"] for r in rows if r["acceptance"] == r["acceptance"]) / len(rows)
        b.plot([r["rtt_ms"] for r in rows], [r["speculative_per_token_ms"] for r in rows], marker="s",
               label=f"speculative, draft = first {k} blocks (acceptance {acc:.2f})")
    b.set_xlabel("device-edge RTT (ms)")
    b.set_ylabel("per-token latency (ms)")
    b.set_title("speculative decoding against RTT")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
