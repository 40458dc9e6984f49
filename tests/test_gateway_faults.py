"""A block service killed (SIGKILL) while the gateway holds concurrent requests: none is lost, every
answer equals the one given before the kill (the pipeline fails over to the spare replica)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn

from edgelam.infer.gateway import create_gateway
from edgelam.infer.topology import free_port, load_topology, open_topology
from edgelam.models.load import load_base

MODEL = "tiny-varied"


def test_a_block_service_killed_under_concurrent_requests_loses_none(tmp_path) -> None:
    path = tmp_path / "spread.yaml"
    path.write_text(f"model: {MODEL}\nmode: pipeline\nemulate_links: false\nreplicas: 2\n"
                    "nodes: [{name: edge1, flops_per_s: 1.0e11}, {name: edge2, flops_per_s: 1.0e11}]\n"
                    "placement: {edge1: [0, 2], edge2: [2, 4]}\n")
    base = load_base(MODEL, "float32", 0)
    prompts = [f"Request {i}: tell me about the number {i}" for i in range(8)]
    with open_topology(load_topology(path), base.model.config) as runner:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_gateway(runner.stream, base.tokenizer, MODEL, 16, 64, None, runner.dead),
                                               port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            while not server.started:
                time.sleep(0.05)
            with httpx.Client(timeout=120) as client:
                want = [client.post(url, json={"prompt": p, "max_tokens": 16}).json()["choices"][0]["text"] for p in prompts]
            victim = next(s for s in runner.services if s.node == "edge1" and s.module == "blocks:0:2")
            first_back = threading.Event()

            def ask(p: str) -> httpx.Response:
                with httpx.Client(timeout=120) as client:
                    r = client.post(url, json={"prompt": p, "max_tokens": 16})
                first_back.set()
                return r

            with ThreadPoolExecutor(len(prompts)) as pool:
                futures = [pool.submit(ask, p) for p in prompts]
                assert first_back.wait(60)
                victim.kill()  # a real SIGKILL while 7 requests wait or run
                answers = [f.result() for f in futures]
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        report = runner.report()
    assert [r.status_code for r in answers] == [200] * len(prompts)
    assert sorted(r.json()["choices"][0]["text"] for r in answers) == sorted(want)
    # every generation in flight on the killed service failed over to the spare, once (they run at once:
    # the gateway's --generations); none moved anywhere else
    moves = [(f["from"], f["to"]) for f in report["failovers"]]
    assert 1 <= len(moves) <= len(prompts) and set(moves) == {("edge1#0", "edge2#1")}
