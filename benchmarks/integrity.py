"""What authenticated links cost (``edgelam.security.mac``): sign + verify per message for the candidate
MACs and the chosen one, at a SmolLM2-135M decode step's hidden state (1 x 1 x 576 float32, ~2.3 KB)
and a 128-token prefill's (1 x 128 x 576, ~295 KB); and, side by side in one run, the per-token
latency of a real 2-stage pipeline (two ``edgelam serve`` processes) with and without keys.

Candidates, each over ``label || body`` (the envelope: direction, route, node, session, position, seq):
  hmac-sha256        hmac.new(key, ..., sha256), verify by recomputing + hmac.compare_digest
  blake2b-keyed      hashlib.blake2b(key=key, digest_size=32), the same
  chacha20-poly1305  cryptography's AEAD with an empty plaintext (AAD only), a fresh random 12-byte nonce
                     per message: the Poly1305 one-time key is new each time
  chosen (mac.py)    sign/verify as the links run them: Signer.sign (headers, hex) + LinkGuard.check
                     (header parsing, replay window)
A hop is a round trip: the request (hidden state up) and the answer (hidden state down) are each
signed once and verified once, so per hop = 2 x per message. Candidates are timed interleaved, one
call each in turn, so drift hits all alike; reported are the median and the 10th..90th percentiles.

    .venv/bin/python benchmarks/integrity.py
    .venv/bin/python benchmarks/integrity.py --repeats 200 --no-pipeline --out /tmp/integrity.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgelam.infer.wire import pack
from edgelam.security.keys import load_keyring, make_keyring, write_keyring
from edgelam.security.mac import Envelope, LinkGuard, Signer, bound, label
from edgelam.store import atomic_write_json

HIDDEN = 576  # SmolLM2-135M


def percentiles(values: list[float]) -> dict[str, float]:
    """Median and 10th / 90th percentiles, in microseconds."""
    q = statistics.quantiles(values, n=10)
    return {"median_us": 1e6 * statistics.median(values), "p10_us": 1e6 * q[0], "p90_us": 1e6 * q[-1]}


def machine() -> str:
    """lscpu's model name and the number of CPUs."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    except (OSError, subprocess.CalledProcessError):
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def candidates(key: bytes, env: Envelope, body: bytes) -> dict[str, Callable[[], None]]:
    """One sign + verify of ``body`` per call, for each primitive."""
    lab = label(env)
    aead = ChaCha20Poly1305(key)

    def keyed(make: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            h = make()
            h.update(lab)
            h.update(body)
            tag = h.digest()
            check = make()
            check.update(lab)
            check.update(body)
            assert hmac.compare_digest(tag, check.digest())
        return run

    def poly() -> None:
        nonce = os.urandom(12)
        tag = aead.encrypt(nonce, b"", lab + body)
        aead.decrypt(nonce, tag, lab + body)  # raises InvalidTag if it does not verify

    ring = make_keyring(["device", "edge1"])
    signer, guard = Signer(ring, "device"), LinkGuard(ring, "edge1")
    session, position = env.session, env.position

    def chosen() -> None:
        _, headers = signer.sign("forward", session, position, body)
        guard.check("forward", headers, body)

    return {"hmac-sha256": keyed(lambda: hmac.new(key, digestmod=hashlib.sha256)),
            "blake2b-keyed": keyed(lambda: hashlib.blake2b(key=key, digest_size=32)),
            "chacha20-poly1305": poly, "chosen (mac.py)": chosen}


def time_macs(tokens: int, repeats: int) -> dict[str, Any]:
    """Per-message sign + verify times of every candidate for a (1, tokens, 576) float32 hidden state."""
    meta = {"session": uuid.uuid4().hex, "position": 40 if tokens == 1 else 0, "adapter": None}
    body = pack({"hidden": torch.randn(1, tokens, HIDDEN)}, meta)
    env = Envelope("request", "forward", "device", *bound(meta), 12345)
    runs = candidates(os.urandom(32), env, body)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"tokens": tokens, "body_bytes": len(body), "repeats": repeats,
            "per_message": {name: percentiles(ts) for name, ts in times.items()}}


def time_pipeline(model: str, prompt: str, new_tokens: int, runs: int) -> dict[str, Any]:
    """Per-token latency of embed (local) -> blocks on 2 services -> head (local), unsigned and signed
    services started together, generations alternating between them."""
    from edgelam.infer.client import HttpTransport, LocalTransport, Stage
    from edgelam.infer.launch import start_service, stop_services, wait_ready
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.infer.pipeline import Generation, Pipeline, prompt_ids
    from edgelam.models.load import load_base

    base = load_base(model, "float32", 0)
    half = int(base.model.config.num_hidden_layers) // 2
    ranges = [f"blocks:0:{half}", f"blocks:{half}:{base.model.config.num_hidden_layers}"]
    with tempfile.TemporaryDirectory() as tmp:
        keys = write_keyring(Path(tmp) / "keys.json", make_keyring(["device", "edge1", "edge2"]))
        plain = [start_service(model, r, f"edge{i + 1}") for i, r in enumerate(ranges)]
        signed = [start_service(model, r, f"edge{i + 1}", extra=["--keys", str(keys), "--node", f"edge{i + 1}"])
                  for i, r in enumerate(ranges)]
        try:
            wait_ready(plain + signed, timeout_s=600)
            signer = Signer(load_keyring(keys), "device")
            local = lambda spec: Stage(spec, [LocalTransport(ModuleHost(model, ModuleSpec.parse(spec)))])  # noqa: E731
            pipes = {
                "without keys": Pipeline(local("embed"), [Stage(s.module, [HttpTransport(s.url, s.node)]) for s in plain],
                                         local("head")),
                "with keys": Pipeline(local("embed"), [Stage(s.module, [HttpTransport(s.url, s.node, signer=signer,
                                                                                      peer=s.node)]) for s in signed],
                                      local("head")),
            }
            ids = prompt_ids(base.tokenizer, prompt)
            per_token: dict[str, list[float]] = {k: [] for k in pipes}
            answers: dict[str, list[int]] = {}
            for rep in range(runs + 1):  # the first round is a warm-up
                for name, pipe in pipes.items():
                    gen = Generation(len(ids))
                    answers[name] = list(pipe.stream(ids, new_tokens, gen=gen))
                    if rep:
                        per_token[name] += [t.seconds for t in gen.timings[1:]]
        finally:
            stop_services(plain + signed)
    if answers["with keys"] != answers["without keys"]:
        raise SystemExit("the signed pipeline's answer differs from the unsigned one")
    return {"model": model, "stages": ranges, "new_tokens": new_tokens, "runs": runs,
            "per_token": {k: {key.replace("_us", "_ms"): v / 1e3 for key, v in percentiles(ts).items()}
                          for k, ts in per_token.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5000, help="sign + verify calls per candidate at the decode size")
    ap.add_argument("--prefill-repeats", type=int, default=500)
    ap.add_argument("--pipeline-model", default="tiny-varied")
    ap.add_argument("--pipeline-tokens", type=int, default=32)
    ap.add_argument("--pipeline-runs", type=int, default=5, help="generations per side (after a warm-up each)")
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--out", default="benchmarks/integrity.json")
    args = ap.parse_args(argv)
    if min(args.repeats, args.prefill_repeats, args.pipeline_runs) < 2:
        raise SystemExit("--repeats, --prefill-repeats and --pipeline-runs must be >= 2")
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": shlex.join([".venv/bin/python", *sys.argv]),  # repository-relative, not this machine's path
        "python": platform.python_version(), "openssl": __import__("ssl").OPENSSL_VERSION,
        "sizes": [time_macs(1, args.repeats), time_macs(128, args.prefill_repeats)],
    }
    print(f"machine: {report['machine']}; {report['openssl']}")
    for size in report["sizes"]:
        print(f"\n1 x {size['tokens']} x {HIDDEN} float32 ({size['body_bytes']:,} bytes), {size['repeats']} repeats:"
              f" sign + verify per message, us (median, p10..p90); per hop (request + answer) = 2x")
        for name, p in size["per_message"].items():
            print(f"  {name:20s} {p['median_us']:9.1f}  ({p['p10_us']:.1f}..{p['p90_us']:.1f})"
                  f"   per hop {2 * p['median_us']:9.1f}")
    if not args.no_pipeline:
        report["pipeline"] = time_pipeline(args.pipeline_model, "Name three colours.", args.pipeline_tokens,
                                           args.pipeline_runs)
        print(f"\n2-stage pipeline ({args.pipeline_model}, {report['pipeline']['stages']}), per-token ms "
              f"(median, p10..p90):")
        for name, p in report["pipeline"]["per_token"].items():
            print(f"  {name:14s} {p['median_ms']:.3f}  ({p['p10_ms']:.3f}..{p['p90_ms']:.3f})")
    atomic_write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
