"""Collaborative inference: module hosts, the wire, services over real HTTP, pipelines with failover, placement."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from edgelam.infer.client import HttpTransport, LocalTransport, Stage
from edgelam.infer.modules import ModuleError, ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Pipeline, prompt_ids
from edgelam.infer.placement import Link, Node, Problem, brute_force, plan
from edgelam.infer.topology import start_service, wait_ready
from edgelam.infer.wire import CONTENT_TYPE, WireError, pack, unpack
from edgelam.models.load import load_base

MODEL = "tiny-varied"


@pytest.fixture(scope="module")
def base():
    return load_base(MODEL, "float32", 0)


def reference(base, ids: list[int], n: int) -> list[int]:
    """Single-process greedy decoding, the whole sequence through the Hugging Face model each step (no
    cache at all): the answer every topology must give."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(base.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def local_pipeline(ranges: list[tuple[int, int]]) -> Pipeline:
    stage = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec), str(spec))])  # noqa: E731
    return Pipeline(stage(ModuleSpec("embed")), [stage(ModuleSpec("blocks", a, b)) for a, b in ranges],
                    stage(ModuleSpec("head")))


def test_module_spec_parsing() -> None:
    assert ModuleSpec.parse("blocks:0:2") == ModuleSpec("blocks", 0, 2) and str(ModuleSpec.parse("head")) == "head"
    assert ModuleSpec.parse("full:3") == ModuleSpec("full", 0, 3) and str(ModuleSpec.parse("full")) == "full"
    for bad in ("blocks:2:2", "blocks:a:3", "tail", "embed:1", "full:0"):
        with pytest.raises(ValueError, match="must be embed, head, full, full:K or blocks:START:STOP"):
            ModuleSpec.parse(bad)


def test_wire_round_trip_and_errors() -> None:
    t = {"hidden": torch.randn(1, 3, 8), "input_ids": torch.tensor([[1, 2, 3]])}
    got, meta = unpack(pack(t, {"session": "s", "position": 4}))
    assert torch.equal(got["hidden"], t["hidden"]) and torch.equal(got["input_ids"], t["input_ids"])
    assert meta == {"session": "s", "position": 4}
    assert len(pack(t, dtype="float16")) < len(pack(t))
    half, _ = unpack(pack(t, dtype="float16"))
    assert half["hidden"].dtype == torch.float32 and torch.allclose(half["hidden"], t["hidden"], atol=1e-2)
    with pytest.raises(WireError, match="not a valid safetensors message"):
        unpack(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")


@pytest.mark.parametrize("ranges", [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_pipeline_equals_single_process_greedy(base, ranges) -> None:
    ids = prompt_ids(base.tokenizer, "What is the capital of France?")
    want = reference(base, ids, 16)
    assert len(set(want)) > 4  # the test model's greedy output varies, so equality means something
    assert local_pipeline(ranges).generate(ids, 16).tokens == want


def test_sessions_roll_back_and_report_gaps(base) -> None:
    host = ModuleHost(MODEL, ModuleSpec("blocks", 0, 4))
    emb = ModuleHost(MODEL, ModuleSpec("embed"))
    ids = torch.tensor([prompt_ids(base.tokenizer, "hello")])
    h = emb.forward({"input_ids": ids}, {})[0]["hidden"]
    full = host.forward({"hidden": h}, {"session": "a", "position": 0})[0]["hidden"]
    n = h.shape[1]
    # feed the first n-3 tokens, then a wrong tail, then roll back to n-3 and feed the right tail
    host.forward({"hidden": h[:, : n - 3]}, {"session": "b", "position": 0})
    host.forward({"hidden": torch.randn(1, 3, h.shape[2])}, {"session": "b", "position": n - 3})
    tail = host.forward({"hidden": h[:, n - 3:]}, {"session": "b", "position": n - 3})[0]["hidden"]
    # the rolled-back session equals a clean one fed in the same chunks, bit for bit ...
    host.forward({"hidden": h[:, : n - 3]}, {"session": "clean", "position": 0})
    clean = host.forward({"hidden": h[:, n - 3:]}, {"session": "clean", "position": n - 3})[0]["hidden"]
    assert torch.equal(tail, clean)
    # ... and the one-pass forward up to float rounding (other chunking, other kernel shapes)
    assert torch.allclose(tail, full[:, n - 3:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ModuleError, match="would leave a gap") as gap:
        host.forward({"hidden": h[:, :1]}, {"session": "b", "position": n + 5})
    assert gap.value.status == 409
    with pytest.raises(ModuleError, match="unknown here") as unknown:
        host.forward({"hidden": h[:, :1]}, {"session": "zz", "position": 3})
    assert unknown.value.status == 409
    with pytest.raises(ModuleError, match="shape"):
        host.forward({"hidden": torch.randn(1, 2, 7)}, {"session": "c", "position": 0})
    assert host.expire(now=1e12) == 3 and host.sessions == {}  # idle sessions are closed


@pytest.fixture(scope="module")
def services():
    """Real processes: blocks 0..1 twice (the second is the failover target) and blocks 2..3."""
    svcs = [start_service(MODEL, "blocks:0:2", "edge1"), start_service(MODEL, "blocks:0:2", "edge1b"),
            start_service(MODEL, "blocks:2:4", "edge2")]
    try:
        wait_ready(svcs)
        yield svcs
    finally:
        for s in svcs:
            s.kill()


def test_service_endpoints_and_bad_requests(services) -> None:
    url = services[2].url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json()["module"] == "blocks:2:4"
    assert httpx.get(f"{url}/info").json()["hidden_size"] == 64
    r = httpx.post(f"{url}/v1/forward", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "safetensors" in r.json()["error"]
    r = httpx.post(f"{url}/v1/forward", content=b"garbage", headers={"content-type": CONTENT_TYPE})
    assert r.status_code == 400 and "not a valid safetensors message" in r.json()["error"]
    body = pack({"hidden": torch.randn(1, 2, 5)}, {"session": "x", "position": 0})
    r = httpx.post(f"{url}/v1/forward", content=body, headers={"content-type": CONTENT_TYPE})
    assert r.status_code == 400 and "(batch, tokens, 64)" in r.json()["error"]
    body = pack({"hidden": torch.randn(1, 2, 64)}, {"session": "x", "position": 0})
    assert httpx.post(f"{url}/v1/forward", content=body, headers={"content-type": CONTENT_TYPE}).status_code == 200
    # float16 on the wire: half the request bytes, the same answer to fp16 precision
    h = torch.randn(1, 4, 64)
    full = HttpTransport(url, wire_dtype="float32").call({"hidden": h}, {"session": "w32", "position": 0})[0]["hidden"]
    half_t = HttpTransport(url, wire_dtype="float16")
    half = half_t.call({"hidden": h}, {"session": "w16", "position": 0})[0]["hidden"]
    assert torch.allclose(full, half, atol=5e-2) and not torch.equal(full, half)
    assert half_t.stats.bytes_up < len(pack({"hidden": h}, {"session": "w16", "position": 0}))
    metrics = httpx.get(f"{url}/metrics").text
    assert 'edgelam_requests_total{module="blocks:2:4"}' in metrics and "edgelam_sessions_open" in metrics
    assert httpx.delete(f"{url}/v1/sessions/x").json() == {"closed": True}


def test_http_pipeline_survives_a_killed_node(base, services) -> None:
    ids = prompt_ids(base.tokenizer, "Name three colours.")
    want = reference(base, ids, 14)
    local = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec))])  # noqa: E731
    first = Stage("blocks 0..1", [HttpTransport(services[0].url, "edge1"), HttpTransport(services[1].url, "edge1b")])
    second = Stage("blocks 2..3", [HttpTransport(services[2].url, "edge2")])
    pipe = Pipeline(local(ModuleSpec("embed")), [first, second], local(ModuleSpec("head")))
    got = []
    from edgelam.infer.pipeline import Generation

    gen = Generation(len(ids))
    for i, token in enumerate(pipe.stream(ids, 14, gen=gen)):
        got.append(token)
        if i == 5:
            services[0].kill()  # a real SIGKILL mid-generation
    assert got == want
    assert len(gen.failovers) == 1
    f = gen.failovers[0]
    assert f["from"] == "edge1" and f["to"] == "edge1b" and f["replayed_chunks"] == 6  # prompt + 5 tokens


def _random_problem(rng: np.random.Generator, relay: str) -> Problem:
    names = [f"n{i}" for i in range(int(rng.integers(1, 5)))]
    nodes = [Node(n, float(rng.uniform(1, 4)), float(10 ** rng.uniform(9, 11))) for n in names]
    everyone = ["device", *names]
    links = {(a, b): Link(float(rng.uniform(0.001, 0.05)), float(10 ** rng.uniform(6, 9)))
             for i, a in enumerate(everyone) for b in everyone[i + 1:]}
    return Problem(nodes, links, int(rng.integers(1, 7)), 1e9, 1.0, 256.0, 0.002, relay)


@pytest.mark.parametrize("relay", ["star", "chain", "push"])
def test_placement_matches_brute_force(relay: str) -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        p = _random_problem(rng, relay)
        try:
            want = brute_force(p)
        except ValueError:
            with pytest.raises(ValueError, match="do not fit"):
                plan(p)
            continue
        got = plan(p)
        assert got.latency_s == pytest.approx(want.latency_s, rel=1e-12)
        blocks = [b - a for _, a, b in got.ranges]
        assert sum(blocks) == p.num_blocks and got.ranges[0][1] == 0  # contiguous, complete
        checked += 1
    assert checked > 30


def test_placement_prefers_fast_nodes_until_hops_cost_more() -> None:
    links = {("device", "fast"): Link(0.01, 1e8), ("device", "slow"): Link(0.01, 1e8), ("fast", "slow"): Link(0.001, 1e9)}
    nodes = [Node("fast", 10.0, 1e11), Node("slow", 10.0, 1e10)]
    p = Problem(nodes, links, 8, 1e9, 1.0, 256.0)
    assert plan(p).ranges == [("fast", 0, 8)]  # one stage: no extra round trip
    tight = Problem([Node("fast", 5.0, 1e11), Node("slow", 10.0, 1e10)], links, 8, 1e9, 1.0, 256.0)
    assert {n: b - a for n, a, b in plan(tight).ranges} == {"fast": 5, "slow": 3}  # memory caps the fast node


def test_infer_cli_runs_a_topology(repo) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "infer", "--topology", "configs/tiny_pipeline.yaml",
                           "--prompt", "Hello", "--max-new-tokens", "6"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "per-token timing" in out and "edge1" in out and "edge2" in out
    assert "time to first token" in out and "transport shaping" in out


def _local(spec: str) -> LocalTransport:
    return LocalTransport(ModuleHost(MODEL, ModuleSpec.parse(spec)), spec)


@pytest.mark.parametrize("draft,fixed", [("full:1", 3), ("full:1", None), ("full:3", 2), ("full", None)])
def test_speculative_equals_upstream_greedy(base, draft, fixed) -> None:
    from edgelam.infer.speculative import AdaptiveGamma, Speculative

    ids = prompt_ids(base.tokenizer, "Tell me a story.")
    want = reference(base, ids, 20)
    st = Speculative(_local(draft), _local("full"), AdaptiveGamma(fixed=fixed)).generate(ids, 20)
    assert st.tokens == want
    assert sum(st.gammas) == st.drafted and 0 <= st.accepted <= st.drafted
    if draft == "full":  # the draft is the target: every drafted token is accepted
        assert st.acceptance == 1.0


def test_draft_length_adapts_to_round_trip_and_acceptance() -> None:
    from edgelam.infer.speculative import AdaptiveGamma

    g = AdaptiveGamma(gamma_max=8)
    for _ in range(10):  # a perfect draft, 1 ms per drafted token, 50 ms round trips: draft long
        g.observe(drafted=4, accepted=4, draft_s=0.004, verify_s=0.050)
    assert g.choose() == 8
    g = AdaptiveGamma(gamma_max=8)
    for _ in range(10):  # a draft that is always wrong: do not draft (but probe now and then)
        g.observe(drafted=4, accepted=0, draft_s=0.004, verify_s=0.050)
    assert g.choose() == 0
    for _ in range(8):
        g.observe(drafted=0, accepted=0, draft_s=0.0, verify_s=0.050)
    assert g.choose() == 2  # the probe
    fast = AdaptiveGamma(gamma_max=8)
    for _ in range(10):  # 60 % acceptance: long drafts pay over a slow link, not over a fast one
        fast.observe(drafted=5, accepted=3, draft_s=0.010, verify_s=0.004)
    slow = AdaptiveGamma(gamma_max=8)
    for _ in range(10):
        slow.observe(drafted=5, accepted=3, draft_s=0.010, verify_s=0.200)
    assert fast.choose() < slow.choose()


def test_escalation_by_confidence(base) -> None:
    from edgelam.infer.speculative import Escalation

    ids = prompt_ids(base.tokenizer, "Hello")
    tiers = lambda: [("device", _local("full:1")), ("edge", _local("full:3")), ("cloud", _local("full"))]  # noqa: E731
    everything_up = Escalation(tiers(), [1.01, 1.01]).generate(ids, 12)
    assert everything_up.tokens == reference(base, ids, 12) and everything_up.shares()["cloud"] == 1.0
    device_only = Escalation(tiers(), [0.0, 0.0]).generate(ids, 12)
    assert device_only.shares()["device"] == 1.0
    assert device_only.tokens == Escalation([("d", _local("full:1"))], []).generate(ids, 12).tokens
    probs = []
    mixed = Escalation(tiers(), [0.05, 0.05]).generate(ids, 12)
    probs = mixed.shares()
    assert sum(probs.values()) == pytest.approx(1.0) and len(mixed.tokens) == 12


def _gateway(repo, topology: str):
    from edgelam.infer.topology import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "gateway", "--topology", topology, "--port", str(port)],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import time

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("gateway did not come up")


def test_openai_client_through_the_gateway(repo, base) -> None:
    from openai import BadRequestError, OpenAI

    proc, url = _gateway(repo, "configs/tiny_pipeline.yaml")
    try:
        client = OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list()] == [MODEL]
        msgs = [{"role": "user", "content": "Hello"}]
        want = reference(base, prompt_ids(base.tokenizer, "Hello"), 8)
        eos = base.tokenizer.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        want_text = base.tokenizer.decode(want, skip_special_tokens=True)
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)
        assert r.choices[0].message.content == want_text and r.usage.completion_tokens == len(want)
        parts = [c.choices[0].delta.content or "" for c in
                 client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stream=True)]
        assert "".join(parts) == want_text and len(parts) >= 2
        comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
        assert isinstance(comp.choices[0].text, str) and comp.usage.completion_tokens <= 5
        with pytest.raises(BadRequestError, match="temperature must be a number between 0 and 2"):
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=2.5)
        bad = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "robot", "content": 1}]})
        assert bad.status_code == 400 and "messages must be" in bad.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("topology,key", [("configs/tiny_speculative.yaml", "acceptance"),
                                          ("configs/tiny_multi_access.yaml", "routes"),
                                          ("configs/tiny_escalation.yaml", "shares")])
def test_quick_topologies_answer_like_single_process(repo, base, topology, key) -> None:
    from edgelam.infer.topology import load_topology, open_topology

    topo = load_topology(repo / topology)
    ids = prompt_ids(base.tokenizer, "Hello")
    with open_topology(topo, base.model.config) as runner:
        got = list(runner.stream(ids, 10, None))
        report = runner.report()
    assert key in report
    if topo.mode != "escalation":  # escalation answers from cheaper tiers by design
        assert got == reference(base, ids, 10)
    assert all(s.proc.poll() is not None for s in runner.services)  # stopped


def test_multi_access_routes_by_load_and_survives_a_server_leaving(base) -> None:
    from edgelam.infer.client import LinkShaper
    from edgelam.infer.multi_access import MultiAccess

    svcs = [start_service(MODEL, "full", f"edge{i}") for i in range(3)]
    try:
        wait_ready(svcs)
        links = [LinkShaper(0.002, None), LinkShaper(0.030, None), LinkShaper(0.030, None)]
        ma = MultiAccess([HttpTransport(s.url, s.node, ln) for s, ln in zip(svcs, links)], seed=1)
        ids = prompt_ids(base.tokenizer, "Hi")
        want = reference(base, ids, 6)
        for _ in range(12):
            assert list(ma.stream(ids, 6)) == want
        # once measured, the fast server wins every pair it is drawn into: it takes most requests
        assert ma.routes.count(0) > 6
        # a server leaving mid-request: the session moves, the answer stays
        got = []
        for i, tok in enumerate(ma.stream(ids, 6)):
            got.append(tok)
            if i == 1:
                svcs[ma.routes[-1]].kill()
        assert got == want and len(ma.failovers) == 1
    finally:
        for s in svcs:
            s.kill()


def test_adapters_are_chosen_per_request(tmp_path) -> None:
    """A federated run's PEFT adapter served by a module: per request, base or adapter, as PEFT computes."""
    from edgelam.config_load import load_config
    from edgelam.lifecycle import run

    run(load_config("configs/tiny.yaml", ["fl.rounds=1", "eval.generate=0", "model.lora.dropout=0.0"]), tmp_path / "fed")
    adapter = tmp_path / "fed" / "adapter"
    tiny = load_base("tiny", "float32", 0)
    host = ModuleHost("tiny", ModuleSpec("full"), {"fed": str(adapter)})
    ids = torch.tensor([prompt_ids(tiny.tokenizer, "2+2=")])
    with_adapter = host.forward({"input_ids": ids}, {"session": "a", "position": 0, "adapter": "fed", "return_logits": True})[0]
    without = host.forward({"input_ids": ids}, {"session": "b", "position": 0, "return_logits": True})[0]
    with pytest.raises(ModuleError, match="adapter 'other' is not loaded"):
        host.forward({"input_ids": ids}, {"session": "c", "position": 0, "adapter": "other"})
    ref = host.served.model  # the PEFT model the host loaded (on its own copy of the base): PEFT's own forward
    with torch.no_grad():
        ref.set_adapter("fed")
        want = ref(input_ids=ids).logits
        with ref.disable_adapter():
            want_base = ref(input_ids=ids).logits
    assert torch.allclose(with_adapter["logits"], want, atol=1e-5)
    assert torch.allclose(without["logits"], want_base, atol=1e-5)
    assert not torch.allclose(with_adapter["logits"], without["logits"], atol=1e-4)
    # the cached base other code shares is untouched: the host's adapters live on its own copy
    assert torch.allclose(tiny.model(input_ids=ids).logits, want_base, atol=1e-5)


def test_pipeline_spread_over_servers_survives_one_leaving(base, tmp_path) -> None:
    """Multi-access, spread: one request's pipeline over two edge servers, each range with a spare on
    the other server; the whole of edge1 leaves mid-generation."""
    from edgelam.infer.topology import load_topology, open_topology

    path = tmp_path / "spread.yaml"
    path.write_text("model: tiny-varied\nmode: pipeline\nemulate_links: false\nreplicas: 2\n"
                    "nodes: [{name: edge1, flops_per_s: 1.0e11}, {name: edge2, flops_per_s: 1.0e11}]\n"
                    "placement: {edge1: [0, 2], edge2: [2, 4]}\n")
    topo = load_topology(path)
    ids = prompt_ids(base.tokenizer, "Hi there")
    with open_topology(topo, base.model.config) as runner:
        assert sorted((s.module, s.node) for s in runner.services) == [
            ("blocks:0:2", "edge1"), ("blocks:0:2", "edge2"), ("blocks:2:4", "edge1"), ("blocks:2:4", "edge2")]
        got = []
        for i, tok in enumerate(runner.stream(ids, 10, None)):
            got.append(tok)
            if i == 3:
                for s in runner.services:
                    if s.node == "edge1":
                        s.kill()
        report = runner.report()
    assert got == reference(base, ids, 10)
    # blocks 0..1 ran on edge1 and moved to its spare on edge2; blocks 2..3 ran on edge2 all along
    assert [(f["stage"], f["from"], f["to"]) for f in report["failovers"]] == [("blocks 0..1 (edge1)", "edge1#0", "edge2#1")]


def test_gateway_reports_a_topology_that_cannot_answer(base) -> None:
    from fastapi.testclient import TestClient

    from edgelam.infer.client import StageDown
    from edgelam.infer.gateway import create_gateway

    def dead(ids, n, eos):
        raise StageDown("no service left for blocks 0..1")
        yield 0

    client = TestClient(create_gateway(dead, base.tokenizer, MODEL))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "no service left for blocks 0..1" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_link_rate_from_the_radio_model() -> None:
    from edgelam.infer.topology import parse_link, radio_rate_bps

    # 300 m: 128.1 + 37.6 log10(0.3) = 108.44 dB; noise -174 + 7 + 10 log10(5e6) = -100.01 dBm;
    # SNR = 23 - 108.44 + 100.01 = 14.57 dB = 28.6; rate = 5e6 log2(29.6) = 24.4 Mbit/s
    assert radio_rate_bps(300.0, 5e6) == pytest.approx(24.45e6, rel=2e-3)
    assert parse_link({"rtt_ms": 20, "distance_m": 300, "bandwidth_mhz": 5}).rate_bps == pytest.approx(radio_rate_bps(300, 5e6))
    assert parse_link({"rtt_ms": 20, "rate_mbps": 7}).rate_bps == 7e6


def test_idle_sessions_expire_in_a_running_service() -> None:
    import time

    svc = start_service(MODEL, "blocks:0:1", "edge", extra=["--session-ttl", "1"])
    try:
        wait_ready([svc])
        body = pack({"hidden": torch.randn(1, 3, 64)}, {"session": "idle", "position": 0})
        assert httpx.post(f"{svc.url}/v1/forward", content=body, headers={"content-type": CONTENT_TYPE}).status_code == 200
        assert httpx.get(f"{svc.url}/info").json()["sessions"] == 1
        time.sleep(2.5)
        assert httpx.get(f"{svc.url}/info").json()["sessions"] == 0
        assert "edgelam_sessions_expired_total{module=\"blocks:0:1\"} 1" in httpx.get(f"{svc.url}/metrics").text
        body = pack({"hidden": torch.randn(1, 1, 64)}, {"session": "idle", "position": 3})
        r = httpx.post(f"{svc.url}/v1/forward", content=body, headers={"content-type": CONTENT_TYPE})
        assert r.status_code == 409 and "replay it from position 0" in r.json()["error"]
    finally:
        svc.kill()
