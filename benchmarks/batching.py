"""Continuous batching: concurrent clients on one `full` service, one at a time against batched.

Side by side in one run, on SmolLM2-135M-Instruct (greedy, chat prompts, the same clients):

A. service: two `edgelam serve --module full` processes, `--max-batch 1` (one request at a time:
   the serving before continuous batching) and the default `--max-batch 32`; N client threads
   each run one generation of T tokens over HTTP (their own KV-cache session) at once:
   aggregate tokens/s, time to first token (TTFT) p50, per-token latency p50 / p99 after the first,
   answers that differ from the same prompt's answer at one client (``wrong``);
B. Hugging Face ``generate`` on N left-padded prompts in one batch in this process (greedy): the
   batching an HF user would reach for first (llama.cpp's server is not installable here);
C. gateway: `edgelam gateway --generations G` in front of one edge server running the whole
   model (`multi_access` with one server), G = 1 (one generation at a time) and G = 16; N clients
   send chat completions: requests/s, tokens/s, p50 / p99 latency.

Each level is repeated; medians with the min..max spread. Every figure is this machine's.

    .venv/bin/python benchmarks/batching.py                                   # recorded in RESULTS.md
    .venv/bin/python benchmarks/batching.py --model tiny-varied --repeats 1 --levels 1 4   # smoke test
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

from edgelam.infer.threads import passive_threads

passive_threads()  # before torch is imported (infer/threads.py)
import httpx  # noqa: E402
import torch  # noqa: E402

from edgelam.infer.client import HttpTransport  # noqa: E402
from edgelam.infer.launch import free_port, start_service, stop_services, wait_ready  # noqa: E402
from edgelam.infer.pipeline import prompt_ids  # noqa: E402
from edgelam.models.load import load_base  # noqa: E402

PROMPTS = [f"Give me one fact about the number {i}." for i in range(16)]


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in reps[0].items():
        values = [r[key] for r in reps]
        if isinstance(value, float):
            out |= {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
        else:
            out[key] = sum(values)  # counts over every repeat
    return out


def service_level(url: str, clients: int, tokens: int, ids: list[list[int]], want: dict[int, list[int]]) -> dict[str, Any]:
    """N clients, one generation each, all at once, through the service's `full` module."""
    ttft: list[float] = []
    gaps: list[float] = []
    wrong, lock, start = [0], threading.Lock(), threading.Barrier(clients)

    def client(c: int) -> int:
        tr = HttpTransport(url, f"c{c}")
        session, pos, cur, out = f"s{c}-{time.monotonic_ns()}", 0, ids[c % len(ids)], []
        start.wait()
        t0 = last = time.perf_counter()
        for i in range(tokens):
            res, _ = tr.call({"input_ids": torch.tensor([cur])}, {"session": session, "position": pos})
            tok = int(res["token_ids"][0, -1])
            now = time.perf_counter()
            with lock:
                (ttft if i == 0 else gaps).append(now - (t0 if i == 0 else last))
            last, out = now, [*out, tok]
            pos, cur = pos + len(cur), [tok]
        tr.close_session(session)
        with lock:
            if want.setdefault(c % len(ids), out) != out:
                wrong[0] += 1
        return len(out)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        made = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": made / wall, "ttft_p50_s": pct(ttft, 0.5), "token_p50_s": pct(gaps, 0.5),
            "token_p99_s": pct(gaps, 0.99), "wrong": wrong[0], "generations": clients}


def hf_level(base: Any, clients: int, tokens: int, prompts: list[str], want: dict[int, list[int]]) -> dict[str, Any]:
    tok = base.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": prompts[c % len(prompts)]}], add_generation_prompt=True,
                                     tokenize=False) for c in range(clients)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = base.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - t0
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    differ = sum(want.get(c % len(prompts)) is not None and want[c % len(prompts)] != new[c] for c in range(clients))
    return {"tokens_per_s": clients * tokens / wall, "wrong": differ, "generations": clients}


def gateway_level(url: str, clients: int, tokens: int, want: dict[str, str]) -> dict[str, Any]:
    lat: list[float] = []
    made, wrong, lock, start = [0], [0], threading.Lock(), threading.Barrier(clients)

    def client(c: int) -> None:
        prompt = PROMPTS[c % len(PROMPTS)]
        with httpx.Client(timeout=600) as http:
            start.wait()
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                              "max_tokens": tokens})
            r.raise_for_status()
            body = r.json()
        with lock:
            lat.append(time.perf_counter() - t0)
            made[0] += body["usage"]["completion_tokens"]
            if want.setdefault(prompt, body["choices"][0]["message"]["content"]) != body["choices"][0]["message"]["content"]:
                wrong[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"requests_per_s": clients / wall, "tokens_per_s": made[0] / wall, "p50_s": pct(lat, 0.5),
            "p99_s": pct(lat, 0.99), "wrong": wrong[0], "requests": clients}


def start_gateway(model: str, generations: int, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    topo = folder / f"batching_g{generations}.yaml"
    topo.write_text(f"model: {model}\nmode: multi_access\nemulate_links: false\nmax_new_tokens: 64\nservers: [edge1]\n"
                    "nodes: [{name: edge1, flops_per_s: 1.0e11}]\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "gateway", "--topology", str(topo), "--port", str(port),
                             "--generations", str(generations)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError("the gateway did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("batching.json"))
    args = ap.parse_args()
    base = load_base(args.model, "float32", 0)
    ids = [prompt_ids(base.tokenizer, p) for p in PROMPTS]
    res: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "repeats": args.repeats,
                           "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                           "command": " ".join(sys.argv)}
    want: dict[int, list[int]] = {}
    services = {"one at a time (--max-batch 1)": start_service(args.model, "full", "edge1", extra=["--max-batch=1"]),
                "batched (--max-batch 32)": start_service(args.model, "full", "edge2")}
    rows = []
    try:
        wait_ready(list(services.values()), timeout_s=600)
        service_level(list(services.values())[0].url, 1, args.tokens, ids, want)  # warm up; fixes the reference
        for n in args.levels:
            for label, svc in services.items():
                reps = [service_level(svc.url, n, args.tokens, ids, want) for _ in range(args.repeats)]
                rows.append({"server": label, "clients": n, **summarize(reps)})
                print(rows[-1], flush=True)
    finally:
        stop_services(list(services.values()))
    res["service"] = rows
    res["service_speedup"] = {n: next(r["tokens_per_s"] for r in rows if r["clients"] == n and "batched" in r["server"])
                              / next(r["tokens_per_s"] for r in rows if r["clients"] == n and "one" in r["server"])
                              for n in args.levels}
    res["hf_generate"] = []
    for n in args.levels:
        reps = [hf_level(base, n, args.tokens, PROMPTS, want) for _ in range(args.repeats)]
        res["hf_generate"].append({"clients": n, **summarize(reps)})
        print(res["hf_generate"][-1], flush=True)
    res["gateway"] = []
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for g in (1, 16):
            proc, url = start_gateway(args.model, g, Path(tmp))
            try:
                gateway_level(url, 1, args.tokens, texts)  # warm up
                for n in args.levels:
                    reps = [gateway_level(url, n, args.tokens, texts) for _ in range(args.repeats)]
                    res["gateway"].append({"generations": g, "clients": n, **summarize(reps)})
                    print(res["gateway"][-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
