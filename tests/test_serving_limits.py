"""Serving under bad input and faults (reliability probe 2, sections 3-5): limits, status codes, no
wedged or orphaned services. Real services and gateways in their own processes, tiny models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgelam.config import ConfigError
from edgelam.infer.client import HttpTransport, Stage
from edgelam.infer.launch import free_port, start_service, wait_ready
from edgelam.infer.modules import ModuleError, ModuleHost, ModuleSpec
from edgelam.infer.service import ErrorGuard
from edgelam.infer.topology import load_topology
from edgelam.infer.wire import CONTENT_TYPE, pack

MODEL = "tiny-varied"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
# two stages with emulated 40 ms round trips: about 0.1 s per token, slow enough to act mid-generation
SLOW_TOPOLOGY = """model: tiny-varied
mode: pipeline
max_new_tokens: 300
emulate_links: true
nodes: [{name: edge1, flops_per_s: 1.0e11}, {name: edge2, flops_per_s: 1.0e11}]
links: [{a: device, b: edge1, rtt_ms: 40, rate_mbps: 100}, {a: device, b: edge2, rtt_ms: 40, rate_mbps: 100}]
placement: {edge1: [0, 2], edge2: [2, 4]}
"""
LONG_PROMPT = "Count to a thousand."  # tiny-varied's greedy answer has no end-of-sequence in its first 300 tokens


def forward(client: httpx.Client, url: str, hidden: torch.Tensor, meta: dict, ctype: str = CONTENT_TYPE) -> httpx.Response:
    return client.post(f"{url}/v1/forward", content=pack({"hidden": hidden}, meta), headers={"content-type": ctype})


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d))
    return kids


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(p)
        except OSError:
            pass
    return out


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def ready_services(pid: int, n: int) -> list[int]:
    """The ``n`` block services started by ``pid``, once each answers /ready."""
    def check() -> list[int] | None:
        kids = children(pid)
        if len(kids) < n:
            return None
        for k in kids:
            args = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
            port = int(args[args.index(b"--port") + 1])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code != 200:
                    return None
            except httpx.TransportError:
                return None
        return kids
    return wait_for(check, 180, f"{n} services of process {pid}")


def module_of(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(b"--module") + 1].decode()


# --- the module service (probe section 3) ---

@pytest.fixture(scope="module")
def service():
    svc = start_service(MODEL, "blocks:0:2", "edge", extra=["--max-request-tokens", "512", "--max-body-mb", "1"])
    try:
        wait_ready([svc])
        yield svc
    finally:
        svc.kill()


def test_zero_tokens_is_a_400_and_the_connection_stays_usable(service) -> None:  # S6
    with httpx.Client() as c:
        before = c.get(f"{service.url}/info").json()["sessions"]
        r = forward(c, service.url, torch.randn(1, 0, 64), {"session": "empty", "position": 0})
        assert r.status_code == 400 and "at least one token" in r.json()["error"]
        assert c.get(f"{service.url}/info").json()["sessions"] == before  # no half-made session
        assert forward(c, service.url, torch.randn(1, 2, 64), {"session": "empty", "position": 0}).status_code == 200


def test_module_inputs_that_used_to_fail_inside_torch_are_400s() -> None:
    embed, head = ModuleHost(MODEL, ModuleSpec("embed")), ModuleHost(MODEL, ModuleSpec("head"))
    with pytest.raises(ModuleError, match="int32 / int64 tensor 'input_ids'") as exc:
        embed.forward({"input_ids": torch.tensor([[1, 2]], dtype=torch.uint8)}, {})
    assert exc.value.status == 400
    with pytest.raises(ModuleError, match="at least one token") as exc:
        head.forward({"hidden": torch.randn(1, 0, 64)}, {})
    assert exc.value.status == 400
    with pytest.raises(ValueError, match="session TTL must be > 0"):
        ModuleHost(MODEL, ModuleSpec("embed"), session_ttl_s=-5)


def test_tokens_per_request_and_context_are_limited(service) -> None:  # S7, S8
    with httpx.Client() as c:
        r = forward(c, service.url, torch.randn(1, 600, 64), {"session": "big", "position": 0})
        assert r.status_code == 413 and "limit of 512" in r.json()["error"]
        for pos in (0, 500):
            assert forward(c, service.url, torch.randn(1, 500, 64), {"session": "long", "position": pos}).status_code == 200
        r = forward(c, service.url, torch.randn(1, 30, 64), {"session": "long", "position": 1000})
        assert r.status_code == 413 and "context of 1024" in r.json()["error"]
    # a client error is not a dead service: the stage keeps it
    stage = Stage("blocks 0..1", [HttpTransport(service.url, "edge")])
    with pytest.raises(ModuleError, match="limit of 512") as exc:
        stage.call({"hidden": torch.randn(1, 600, 64)}, {"session": "s", "position": 0}, stateful=True)
    assert exc.value.status == 413 and stage.dead == set() and stage.failovers == []


def test_body_limit_is_checked_before_the_body_is_read(service) -> None:  # S9, S10
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # 3 GiB announced, 1 kB sent
        s.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-safetensors\r\n"
                  b"Content-Length: 3221225472\r\n\r\n" + b"x" * 1000)
        head = b"".join(iter(lambda: s.recv(4096), b"")).decode()  # until the service closes the connection
    assert head.startswith("HTTP/1.1 413") and "connection: close" in head.lower() and "1048576" in head

    def chunks():  # no Content-Length: the running size is checked
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{service.url}/v1/forward", content=chunks(), headers={"content-type": CONTENT_TYPE})
    assert r.status_code == 413 and "more than 1048576 bytes" in r.json()["error"]


def test_media_type_is_case_insensitive_with_parameters(service) -> None:  # S17
    with httpx.Client() as c:
        for ctype in ("Application/X-Safetensors", "application/x-safetensors; charset=binary"):
            assert forward(c, service.url, torch.randn(1, 2, 64), {"session": "m", "position": 0}, ctype).status_code == 200
        assert forward(c, service.url, torch.randn(1, 2, 64), {"session": "m", "position": 0}, "text/plain").status_code == 415


def errors_total(url: str) -> float:
    line = next(ln for ln in httpx.get(f"{url}/metrics").text.splitlines() if ln.startswith("edgelam_errors_total"))
    return float(line.rsplit(" ", 1)[1])


def test_every_error_response_is_counted(service) -> None:  # S18
    before = errors_total(service.url)
    with httpx.Client() as c:
        assert c.post(f"{service.url}/v1/forward", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
        assert c.post(f"{service.url}/v1/forward", content=b"junk", headers={"content-type": CONTENT_TYPE}).status_code == 400
        assert forward(c, service.url, torch.randn(1, 2, 7), {"session": "e", "position": 0}).status_code == 400
        assert forward(c, service.url, torch.randn(1, 600, 64), {"session": "e", "position": 0}).status_code == 413
        assert forward(c, service.url, torch.randn(1, 1, 64), {"session": "nope", "position": 5}).status_code == 409
    assert errors_total(service.url) == before + 5


def test_unexpected_errors_are_a_json_500_that_closes_the_connection() -> None:  # S6, G4 (the safety net)
    app = FastAPI()
    stats = {"errors_total": 0}
    app.add_middleware(ErrorGuard, stats=stats)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("cannot reshape tensor of 0 elements")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert r.json() == {"error": "internal error: RuntimeError: cannot reshape tensor of 0 elements"}
    assert stats["errors_total"] == 1


def test_a_noisy_service_never_wedges_on_its_stderr(service) -> None:  # G10
    assert service.proc.stderr is None and service.log is not None  # a log file, not a pipe nobody reads
    port = int(service.url.rsplit(":", 1)[1])
    for _ in range(2500):  # each malformed request makes uvicorn write a warning line to stderr
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"NOT HTTP\r\n\r\n")
            s.recv(256)
    assert service.log.stat().st_size > 64 * 1024  # more than a pipe buffer holds
    assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200
    assert forward(httpx.Client(timeout=10), service.url, torch.randn(1, 2, 64), {"session": "n", "position": 0}).status_code == 200


# --- command lines and topology files: one clear line, before anything starts ---

def cli(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgelam.cli", *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--module", "blocks:0:2", "--session-ttl", "-5"], "--session-ttl must be > 0"),  # S20
    (["--module", "blocks:0:2", "--port", "99999"], "--port must be a TCP port between 1 and 65535"),  # S22
    (["--module", "blocks:3:2"], "blocks:START:STOP with START < STOP"),  # S21: no emoji
])
def test_serve_rejects_bad_flags_in_one_line(repo, args, message) -> None:
    proc = cli(repo, "serve", "--model", MODEL, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "\U0001f170" not in proc.stderr


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("nodes: [{name: e, flops_per_s: 1.0e11}]\nlinks: [{a: device, b: e, rtt_ms: 5, rate_mbps: 0}]\n", "rate_mbps must be a number > 0"),
    ("max_new_tokens: -3\nnodes: [{name: e, flops_per_s: 1.0e11}]\n", "max_new_tokens must be an integer >= 1"),
    ("model: tiny-encoder\nnodes: [{name: e, flops_per_s: 1.0e11}]\n", "is an encoder"),
    ("nodes: [{name: e}]\n", "flops_per_s is required"),
    ("mode: speculative\nnodes: [{name: e, flops_per_s: 1.0e11}]\ntarget: {node: e}\ndraft: 'full:0'\n", "draft: module"),
    ("mode: escalation\nnodes: [{name: e, flops_per_s: 1.0e11}]\ntiers: [{node: device}, e]\n", "escalation needs tiers"),
])
def test_topology_file_errors_name_the_key(tmp_path, text, message) -> None:
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_topology(path)


def test_infer_rejects_an_empty_prompt_before_starting_services(repo) -> None:
    for prompt in (["--prompt", ""], []):  # empty, or left out (a generating topology needs one)
        proc = cli(repo, "infer", "--topology", "configs/tiny_pipeline.yaml", "--raw", *prompt)
        assert proc.returncode == 2 and "--prompt is missing or empty" in proc.stderr and "Traceback" not in proc.stderr
        assert "services:" not in proc.stdout


# --- the gateway (probe section 4) and faults (section 5) ---

@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    topo = tmp_path_factory.mktemp("gw") / "slow.yaml"
    topo.write_text(SLOW_TOPOLOGY)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "gateway", "--topology", str(topo), "--port", str(port),
                             "--max-tokens-limit", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, "the gateway exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 180, "the gateway")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("extra,status,message", [
    ({"temperature": "hot"}, 400, "temperature must be a number"),  # G4
    ({"stream": "no"}, 400, "stream must be true or false"),  # G5
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or a list of at most 4"),  # G6
    ({"model": "gpt-4"}, 404, "serves 'tiny-varied'"),  # G6
    ({"max_tokens": 100}, 400, "limit of 64"),  # G7
    ({"messages": [{"role": "user", "content": "x" * 1500}]}, 400, "context is 1024 tokens"),  # G8
    ({"messages": [{"role": "user", "content": "x" * 40000}]}, 400, "context is 1024 tokens"),  # G9
    ({"messages": [{"role": "user", "content": "x" * 1000}], "max_tokens": 60}, 400, "ask for at most"),
])
def test_gateway_answers_client_errors_with_4xx(gateway, extra, status, message) -> None:
    _, url = gateway
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as c:
        r = c.post("/chat/completions", json={"messages": HI, **extra})
        assert r.status_code == status and message in r.json()["error"]["message"]
        # the same keep-alive connection still answers, and no service was marked dead
        ok = c.post("/chat/completions", json={"messages": HI, "max_tokens": 2, "model": MODEL})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_dropped_stream_frees_the_gateway_at_once(gateway) -> None:  # G13
    _, url = gateway
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as c:
        with c.stream("POST", "/chat/completions", json={"messages": HI, "max_tokens": 60, "stream": True}) as r:
            lines = r.iter_lines()
            got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert len(got) == 3  # the connection is closed mid-generation
    with httpx.Client(base_url=f"{url}/v1", timeout=30) as c:  # generous; before the fix this waited minutes
        assert c.post("/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200


@linux_only
def test_a_dead_stage_is_reported_and_sigterm_stops_the_services(gateway) -> None:  # F4, F6, F7 (gateway)
    proc, url = gateway
    kids = {module_of(k): k for k in ready_services(proc.pid, 2)}
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as c:
        with c.stream("POST", "/chat/completions", json={"messages": HI, "max_tokens": 60, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 4:
                    os.kill(kids["blocks:2:4"], signal.SIGKILL)  # the only service of blocks 2..3
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] != "[DONE]" and "no service left for blocks 2..3" in json.loads(events[-1])["error"]["message"]
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json() == {"status": "degraded", "dead": ["blocks:2:4"]}
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "stream": True})
    assert r.status_code == 503 and "cannot answer" in r.json()["error"]["message"]
    # SIGTERM to the gateway: its remaining service (blocks 0..1) stops with it
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert wait_for(lambda: not alive([kids["blocks:0:2"]]), 30, "the services to stop")


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_infer_never_orphans_its_services(repo, tmp_path, sig) -> None:  # F7 (infer)
    topo = tmp_path / "slow.yaml"
    topo.write_text(SLOW_TOPOLOGY)
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "infer", "--topology", str(topo), "--prompt", LONG_PROMPT],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kids = ready_services(proc.pid, 2)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert wait_for(lambda: not alive(kids), 30, "the services to stop")  # kill -9: PR_SET_PDEATHSIG
    finally:
        if proc.poll() is None:
            proc.kill()


@linux_only
def test_infer_with_a_dead_stage_prints_the_partial_answer_and_one_error_line(repo, tmp_path) -> None:  # F2
    topo = tmp_path / "slow.yaml"
    topo.write_text(SLOW_TOPOLOGY)
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "infer", "--topology", str(topo), "--prompt", LONG_PROMPT],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kids = ready_services(proc.pid, 2)
        time.sleep(2.0)  # some tokens first
        os.kill(next(k for k in kids if module_of(k) == "blocks:2:4"), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err
    assert "no service left for blocks" in err and "the answer above is partial" in err
    assert "answer:" in out and "per-token timing" in out
