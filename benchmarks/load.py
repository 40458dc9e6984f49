"""Load: the gateway and a 2-stage pipeline under 1, 4, 16 and 64 concurrent clients.

A. gateway: `edgelam gateway` (its own process) in front of a 2-stage pipeline of `edgelam serve`
   processes (2 replicas per range). N client threads send chat completions back to back until
   the level has sent max(16, N) requests: requests/s, p50 / p99 latency, errors (non-200), lost
   (sent, never answered), and the resident memory of the gateway and its services after each
   level. Then 16 clients again while the primary service of the first range is SIGKILLed.
B. pipeline: the same two block services without the gateway. N client threads each run one
   greedy generation through them at once (their own sessions): aggregate tokens/s, per-token
   latency p50 / p99, errors, and the services' memory.

Every answer is compared with the same prompt's answer at one client (exact greedy decoding; the
tests check that one against single-process decoding). Each level is repeated; medians and the
min..max spread are reported.

    .venv/bin/python benchmarks/load.py                       # SmolLM2, recorded in RESULTS.md
    .venv/bin/python benchmarks/load.py --model tiny-varied --repeats 1 --levels 1 4   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from edgelam.infer.client import HttpTransport, LocalTransport, Stage
from edgelam.infer.launch import free_port, start_service, wait_ready
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Pipeline, prompt_ids
from edgelam.models.load import load_base

PROMPTS = [f"Give me one fact about the number {i}." for i in range(8)]


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes and their children, MB."""
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            total += sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def topology_file(model: str, layers: int, folder: Path) -> Path:
    half = layers // 2
    path = folder / "load.yaml"
    path.write_text(f"model: {model}\nmode: pipeline\nemulate_links: false\nreplicas: 2\n"
                    "nodes: [{name: edge1, flops_per_s: 1.0e11}, {name: edge2, flops_per_s: 1.0e11}]\n"
                    f"placement: {{edge1: [0, {half}], edge2: [{half}, {layers}]}}\n")
    return path


def gateway_level(url: str, clients: int, total: int, tokens: int, want: dict[str, str]) -> dict[str, Any]:
    sent, lock = [0], threading.Lock()
    latencies: list[float] = []
    errors, wrong = [0], [0]
    first_error: list[str] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if sent[0] >= total:
                        return
                    i = sent[0]
                    sent[0] += 1
                prompt = PROMPTS[i % len(PROMPTS)]
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens})
                except httpx.TransportError:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    if r.status_code != 200:
                        errors[0] += 1
                        first_error.append(f"{r.status_code} {r.text[:300]}")
                        continue
                    latencies.append(time.perf_counter() - t0)
                    text = r.json()["choices"][0]["message"]["content"]
                    if want.setdefault(prompt, text) != text:
                        wrong[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"rps": len(latencies) / wall, "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
            "errors": errors[0], "lost": total - len(latencies) - errors[0], "wrong": wrong[0], "requests": total,
            **({"first_error": first_error[0]} if first_error else {})}


def kill_level(url: str, gateway_pid: int, layers: int, tokens: int, want: dict[str, str]) -> dict[str, Any]:
    """16 clients, 32 requests; the first-started service of the first block range (the primary:
    replica 0) gets SIGKILL once the first answer is back. Lost or wrong answers are counted."""
    first = sorted((p for p in psutil.Process(gateway_pid).children(recursive=True)
                    if f"blocks:0:{layers // 2}" in " ".join(p.cmdline())), key=lambda p: p.create_time())[0]
    name = " ".join(first.cmdline()[-6:])  # read before it dies
    killer = threading.Thread(target=lambda: (time.sleep(0.5), first.kill()))
    killer.start()
    out = gateway_level(url, 16, 32, tokens, want)
    killer.join()
    return out | {"killed": name}


def pipeline_level(model: str, urls: list[str], ranges: list[tuple[int, int]], clients: int, tokens: int,
                   ids: list[list[int]], want: dict[int, list[int]], sequential: bool = False) -> dict[str, Any]:
    hosts = {name: ModuleHost(model, ModuleSpec(name)) for name in ("embed", "head")}
    gaps: list[float] = []
    errors, wrong, lock = [0], [0], threading.Lock()

    def client(c: int) -> int:
        blocks = [Stage(f"{a}:{b}", [HttpTransport(u, f"{a}:{b}")]) for u, (a, b) in zip(urls, ranges)]
        local = {n: Stage(n, [LocalTransport(h, n)]) for n, h in hosts.items()}
        try:
            gen = Pipeline(local["embed"], blocks, local["head"]).generate(ids[c % len(ids)], tokens)
        except Exception:  # noqa: BLE001 - counted as an error of this level
            with lock:
                errors[0] += 1
            return 0
        with lock:
            gaps.extend(t.seconds for t in gen.timings[1:])  # per generated token after the first
            if want.setdefault(c % len(ids), gen.tokens) != gen.tokens:
                wrong[0] += 1
        return len(gen.tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(1 if sequential else clients) as pool:
        made = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": made / wall, "p50_token_s": pct(gaps, 0.5), "p99_token_s": pct(gaps, 0.99),
            "errors": errors[0], "wrong": wrong[0], "sessions": clients}


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in reps[0].items():
        values = [r[key] for r in reps]
        if isinstance(value, float):
            out |= {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
        else:
            out[key] = sum(values)  # counts: errors, lost, wrong, requests over every repeat
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("load.json"))
    args = ap.parse_args()
    base = load_base(args.model, "float32", 0)
    layers = int(base.model.config.num_hidden_layers)
    tmp = Path(tempfile.mkdtemp(prefix="edgelam-load-"))
    res: dict[str, Any] = {"gateway": {}, "pipeline": {}}
    port = free_port()
    gw = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "gateway", "--topology", str(topology_file(args.model, layers, tmp)),
                           "--port", str(port), "--max-concurrent", str(4 * max([*args.levels, 16]))],
                          stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert gw.poll() is None and time.monotonic() < deadline, (tmp / "gateway.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        want: dict[str, str] = {}
        gateway_level(url, 1, len(PROMPTS), args.tokens, want)  # warm-up; the one-client answers
        res["gateway_rss_start_mb"] = rss_mb([gw.pid])
        for n in args.levels:
            reps = [gateway_level(url, n, max(16, n), args.tokens, want) for _ in range(args.repeats)]
            res["gateway"][n] = summarize(reps) | {"rss_mb": rss_mb([gw.pid])}
            print(f"gateway, {n} clients: {res['gateway'][n]}", flush=True)
        res["gateway_kill"] = kill_level(url, gw.pid, layers, args.tokens, want)
        print(f"gateway, a block service killed under 16 clients: {res['gateway_kill']}", flush=True)
    finally:
        gw.terminate()
        gw.wait(timeout=60)
    half = layers // 2
    ranges = [(0, half), (half, layers)]
    services = [start_service(args.model, f"blocks:{a}:{b}", f"n{a}") for a, b in ranges]
    try:
        wait_ready(services, timeout_s=600)
        ids = [prompt_ids(base.tokenizer, p) for p in PROMPTS]
        want_ids: dict[int, list[int]] = {}
        pipeline_level(args.model, [s.url for s in services], ranges, len(PROMPTS), args.tokens, ids, want_ids,
                       sequential=True)  # warm-up; the one-client answers
        res["pipeline_rss_start_mb"] = rss_mb([s.proc.pid for s in services])
        for n in args.levels:
            reps = [pipeline_level(args.model, [s.url for s in services], ranges, n, args.tokens, ids, want_ids)
                    for _ in range(args.repeats)]
            res["pipeline"][n] = summarize(reps) | {"rss_mb": rss_mb([s.proc.pid for s in services])}
            print(f"pipeline, {n} clients: {res['pipeline'][n]}", flush=True)
    finally:
        for s in services:
            s.kill()
    res["meta"] = {"date": str(datetime.date.today()), "machine": f"{platform.processor() or platform.machine()}, "
                   f"{psutil.cpu_count()} cores", "model": args.model, "tokens": args.tokens, "repeats": args.repeats,
                   "command": " ".join(["python", "benchmarks/load.py", *sys.argv[1:]])}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
