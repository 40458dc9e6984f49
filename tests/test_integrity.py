"""Authenticated, tamper-evident links (security/): keyrings, MACs on every hop, a real man in the
middle (tests/mitm_relay.py, its own process) between a real HttpTransport and real `edgelam serve`
processes, failover and session replay with keys on, TLS, and the gateway's API keys."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from edgelam.config import ConfigError
from edgelam.infer.client import HttpTransport, LocalTransport, StageDown, Stage
from edgelam.infer.launch import free_port, start_service, stop_services
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Generation, Pipeline, prompt_ids
from edgelam.infer.topology import load_topology
from edgelam.infer.wire import CONTENT_TYPE, pack
from edgelam.models.load import load_base
from edgelam.security.keys import KeyringError, load_keyring, make_keyring, write_keyring
from edgelam.security.mac import (
    MAC,
    NODE,
    POSITION,
    SEQ,
    SESSION,
    Envelope,
    IntegrityError,
    LinkGuard,
    LinkRefused,
    Signer,
    sign,
    verify,
)
from edgelam.security.tls import client_context, make_tls, tls_paths

MODEL = "tiny-varied"
HERE = Path(__file__).resolve().parent
NODES = ["device", "edge1", "edge1b", "edge2"]


def reference(base, ids: list[int], n: int) -> list[int]:
    """Unsigned single-process greedy decoding (the whole sequence each step, no cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(base.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def wait_up(url: str, proc: subprocess.Popen, trust=True, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the process exited"
        try:
            if httpx.get(f"{url}/health", timeout=1, verify=trust).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


@pytest.fixture(scope="module")
def base():
    return load_base(MODEL, "float32", 0)


TOPOLOGY = """model: tiny-varied
mode: pipeline
max_new_tokens: 8
emulate_links: false
keys: {keys}
nodes: [{{name: edge1, flops_per_s: 1.0e11}}, {{name: edge2, flops_per_s: 1.0e11}}]
placement: {{edge1: [0, 2], edge2: [2, 4]}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, base):
    """Real processes, started in parallel: a signed topology launched as `edgelam infer` / `edgelam
    gateway` do (edge1: blocks 0..1, edge2: blocks 2..3), a spare blocks 0..1 on edge1b served over
    TLS, and the man in the middle in front of edge1."""
    from edgelam.infer.topology import open_topology

    tmp = tmp_path_factory.mktemp("integrity")
    keys = write_keyring(tmp / "keys.json", make_keyring(NODES, ["alice"]))
    tls = make_tls(tls_paths(keys))
    spare = start_service(MODEL, "blocks:0:2", "edge1b", extra=["--keys", str(keys), "--node", "edge1b",
                                                                "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)])
    spare = replace(spare, url=spare.url.replace("http://", "https://"))
    topo = tmp / "signed.yaml"
    topo.write_text(TOPOLOGY.format(keys=keys))
    relay_port = free_port()
    relay = None
    try:
        with open_topology(load_topology(topo), base.model.config) as runner:
            relay = subprocess.Popen([sys.executable, str(HERE / "mitm_relay.py"), "--upstream",
                                      runner.services[0].url, "--port", str(relay_port)], stderr=subprocess.DEVNULL)
            wait_up(spare.url, spare.proc, trust=client_context(tls.ca))
            wait_up(f"http://127.0.0.1:{relay_port}", relay)
            yield {"keys": keys, "ring": load_keyring(keys), "tls": tls, "runner": runner, "spare": spare,
                   "edge1": runner.services[0], "edge2": runner.services[1], "relay": f"http://127.0.0.1:{relay_port}",
                   "topology": topo}
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=20)
        stop_services([spare])


# --- keyrings ---

def test_keyring_files_are_private_and_checked(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgelam.cli import app

    out = tmp_path / "cli.json"
    made = CliRunner().invoke(app, ["keys", "--out", str(out), "--node", "device", "--node", "edge1", "--api-key",
                                    "bob", "--tls"])
    assert made.exit_code == 0, made.output
    assert {p.name for p in tmp_path.iterdir()} == {"cli.json", "cli-ca.pem", "cli-cert.pem", "cli-key.pem"}
    again = CliRunner().invoke(app, ["keys", "--out", str(out), "--node", "x"])
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    p = out
    assert os.stat(p).st_mode & 0o777 == 0o600 and os.stat(tmp_path / "cli-key.pem").st_mode & 0o777 == 0o600
    ring = load_keyring(p)
    assert set(ring.nodes) == {"device", "edge1"} and ring.api_keys["bob"].startswith("sk-edgelam-")
    assert ring.nodes["device"].hex() not in repr(ring) and ring.api_keys["bob"] not in repr(ring)  # not in logs
    with pytest.raises(KeyringError, match="already exists"):
        write_keyring(p, make_keyring(["device"]))
    os.chmod(p, 0o644)
    with pytest.raises(KeyringError, match=r"open to group or others \(mode 0644\); run `chmod 600"):
        load_keyring(p)
    p.write_text('{"edgelam_keyring": 1, "nodes": {"device": "abcd"}}')
    os.chmod(p, 0o600)
    with pytest.raises(KeyringError, match="32-byte secret as 64 hex digits"):
        load_keyring(p)
    p.write_text("[1, 2")
    with pytest.raises(KeyringError, match="not valid JSON"):
        load_keyring(p)
    with pytest.raises(KeyringError, match="not found; make one with `edgelam keys"):
        load_keyring(tmp_path / "nope.json")
    with pytest.raises(KeyringError, match="must be 1-64 letters"):
        make_keyring(["bad name"])


def test_topology_and_gateway_keys_are_checked_before_anything_starts(tmp_path) -> None:
    from edgelam.cli import run_gateway

    keys = write_keyring(tmp_path / "k.json", make_keyring(["device", "edge1", "edge2"]))
    t = tmp_path / "t.yaml"
    t.write_text(TOPOLOGY.format(keys=keys).replace("edge2", "edge3"))
    with pytest.raises(ConfigError, match="no key for edge3"):
        load_topology(t)
    t.write_text(TOPOLOGY.format(keys=keys))
    assert load_topology(t).keys == str(keys)
    with pytest.raises(KeyringError, match="has no api_keys; make one with"):
        run_gateway(t, api_keys=keys)


# --- the MAC ---

def test_tampering_with_any_signed_field_breaks_verification() -> None:
    key = bytes(range(32))
    env = Envelope("request", "forward", "device", "s1", "7", 42)
    body = pack({"hidden": torch.randn(1, 1, 576)}, {"session": "s1", "position": 7})
    mac = sign(key, env, body)
    assert verify(key, env, body, mac)
    for field, value in [("seq", 43), ("session", "s2"), ("position", "8"), ("node", "edge1"),
                         ("direction", "response"), ("route", "close")]:
        assert not verify(key, replace(env, **{field: value}), body, mac), field
    assert not verify(key, env, body[:-1] + bytes([body[-1] ^ 1]), mac)
    assert not verify(bytes(32), env, body, mac) and not verify(key, env, body, mac[:-2] + "00")
    assert sign(key, env, body) != mac  # a fresh nonce each time: never the same Poly1305 key twice
    # the same through the service's guard and real headers
    ring = make_keyring(["device", "edge1"])
    guard, signer = LinkGuard(ring, "edge1"), Signer(ring, "device")
    sent, headers = signer.sign("forward", "s1", "7", body)
    for name, value in [(SEQ, "999"), (SESSION, "s2"), (POSITION, "8"), (NODE, "edge1")]:
        with pytest.raises(LinkRefused, match="MAC does not verify") as refused:
            guard.check("forward", {**headers, name: value}, body)
        assert refused.value.status == 403
    with pytest.raises(LinkRefused, match=f"missing {MAC}") as missing:
        guard.check("forward", {k: v for k, v in headers.items() if k != MAC}, body)
    assert missing.value.status == 401
    assert guard.check("forward", headers, body).seq == sent.seq
    with pytest.raises(LinkRefused, match="not greater than the last accepted"):
        guard.check("forward", headers, body)  # the same message again
    guard.check("forward", Signer(ring, "device").sign("forward", "s1", "7", body)[1], body)  # a restarted sender
    answer = guard.answer(sent, b"out")
    signer.check_answer(sent, answer, b"out", "edge1", "edge1")
    with pytest.raises(IntegrityError, match="for request #"):
        signer.check_answer(replace(sent, seq=sent.seq + 1), answer, b"out", "edge1", "edge1")


# --- a real man in the middle between a real HttpTransport and a real service ---

def through_relay(world, mode: str) -> HttpTransport:
    assert httpx.put(f"{world['relay']}/__relay/mode/{mode}").json() == {"mode": mode}
    return HttpTransport(world["relay"], "edge1", signer=Signer(world["ring"], "device"), peer="edge1")


def hidden(n: int = 3) -> dict[str, torch.Tensor]:
    return {"hidden": torch.randn(1, n, 64)}


def test_the_relay_passes_genuine_traffic(world) -> None:
    out, _ = through_relay(world, "pass").call(hidden(), {"session": "ok", "position": 0})
    assert out["hidden"].shape == (1, 3, 64)


@pytest.mark.parametrize("mode,message", [
    ("flip-request", r"HTTP 403\): the MAC does not verify"),  # (a)
    ("flip-response", "the answer's MAC does not verify"),  # (b)
])
def test_a_flipped_bit_is_caught(world, mode, message) -> None:
    with pytest.raises(IntegrityError, match=message):
        through_relay(world, mode).call(hidden(), {"session": mode, "position": 0})


def test_a_replayed_request_is_refused(world) -> None:  # (c)
    t = through_relay(world, "replay")
    t.call(hidden(), {"session": "replay", "position": 0})
    with pytest.raises(IntegrityError, match=r"HTTP 403\).*not greater than the last accepted.*replayed or reordered"):
        t.call(hidden(1), {"session": "replay", "position": 3})


def test_swapped_requests_are_refused(world) -> None:  # (d)
    t = through_relay(world, "swap")
    errors: list[Exception] = []

    def first() -> None:
        try:
            t.call(hidden(), {"session": "swap", "position": 0})
        except Exception as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    th = threading.Thread(target=first)
    th.start()
    time.sleep(0.5)  # the relay now holds the first request
    out, _ = t.call(hidden(), {"session": "swap", "position": 0})  # the second overtakes it and is served
    th.join(timeout=30)
    assert out["hidden"].shape == (1, 3, 64)
    assert len(errors) == 1 and isinstance(errors[0], IntegrityError)
    assert "not greater than the last accepted" in str(errors[0])


def test_unsigned_and_wrongly_signed_requests_are_refused(world) -> None:
    url = world["edge1"].url
    body = pack(hidden(), {"session": "u", "position": 0})
    r = httpx.post(f"{url}/v1/forward", content=body, headers={"content-type": CONTENT_TYPE})
    assert r.status_code == 401 and "missing X-EdgeLAM-Node" in r.json()["error"] and "--keys" in r.json()["error"]
    with pytest.raises(IntegrityError, match="HTTP 401"):
        HttpTransport(url, "edge1").call(hidden(), {"session": "u", "position": 0})
    other = make_keyring(NODES)  # the same names, other secrets
    with pytest.raises(IntegrityError, match=r"HTTP 403\): the MAC does not verify for node 'device'"):
        HttpTransport(url, "edge1", signer=Signer(other, "device")).call(hidden(), {"session": "u", "position": 0})
    with pytest.raises(IntegrityError, match="unknown node 'mallory'"):
        HttpTransport(url, "edge1", signer=Signer(make_keyring(["mallory"]), "mallory")).call(
            hidden(), {"session": "u", "position": 0})
    r = httpx.delete(f"{url}/v1/sessions/ok")  # closing someone's session needs a signature too
    assert r.status_code == 401


def test_tls_checks_the_servers_certificate(world) -> None:
    spare, ca = world["spare"], str(world["tls"].ca)
    t = HttpTransport(spare.url, "edge1b", signer=Signer(world["ring"], "device"), peer="edge1b", ca=ca)
    assert t.call(hidden(), {"session": "tls", "position": 0})[0]["hidden"].shape == (1, 3, 64)
    t.client.close()  # a TLS service's shutdown waits for its open connections' close_notify
    with pytest.raises(StageDown, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted without the CA
        HttpTransport(spare.url, "edge1b").call(hidden(), {"session": "tls2", "position": 0})


def test_session_replay_works_with_keys_on(world) -> None:
    """A lost session is replayed to the same service under the same session id with new sequence numbers."""
    ring, svc = world["ring"], world["edge2"]
    stage = Stage("blocks 2..3", [HttpTransport(svc.url, "edge2", signer=Signer(ring, "device"), peer="edge2")])
    local = ModuleHost(MODEL, ModuleSpec("blocks", 2, 4))
    h = torch.randn(1, 5, 64)
    stage.call({"hidden": h[:, :4]}, {"session": "lost", "position": 0}, stateful=True)
    stage.transport.close_session("lost")  # signed: the service forgets the session
    got = stage.call({"hidden": h[:, 4:]}, {"session": "lost", "position": 4}, stateful=True)["hidden"]
    assert [f["replayed_chunks"] for f in stage.failovers] == [1]
    local.forward({"hidden": h[:, :4]}, {"session": "x", "position": 0})
    assert torch.equal(got, local.forward({"hidden": h[:, 4:]}, {"session": "x", "position": 4})[0]["hidden"])


def test_a_launched_signed_topology_answers_like_single_process(world, base) -> None:
    """`keys:` in the topology: the launcher started each service with --keys/--node and the device's
    transports sign; the answer is token for token unsigned single-process greedy decoding."""
    ids = prompt_ids(base.tokenizer, "Hello")
    assert list(world["runner"].stream(ids, 8, None)) == reference(base, ids, 8)
    for svc in world["runner"].services:
        assert httpx.post(f"{svc.url}/v1/forward", content=b"x", headers={"content-type": CONTENT_TYPE}).status_code == 401


# --- the gateway's API keys, in front of the signed topology ---

def test_gateway_needs_an_api_key(world, base) -> None:
    from fastapi.testclient import TestClient
    from openai import OpenAI, PermissionDeniedError

    from edgelam.infer.gateway import create_gateway

    runner = world["runner"]
    app = create_gateway(runner.stream, base.tokenizer, MODEL, 8, 64, 1024, runner.dead, api_keys=world["ring"].api_keys)
    hi = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    with TestClient(app) as http:
        assert http.get("/health").json() == {"status": "ok"}  # stays open
        r = http.post("/v1/chat/completions", json=hi)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = http.post("/v1/chat/completions", json=hi, headers={"authorization": "Basic YWxpY2U6eA=="})
        assert r.status_code == 401 and "must be `Bearer <API key>`" in r.json()["error"]["message"]
        with pytest.raises(PermissionDeniedError, match="not valid"):
            OpenAI(base_url="http://testserver/v1", api_key="sk-edgelam-wrong", http_client=http).models.list()
        client = OpenAI(base_url="http://testserver/v1", api_key=world["ring"].api_keys["alice"], http_client=http)
        want = reference(base, prompt_ids(base.tokenizer, "Hello"), 8)
        eos = base.tokenizer.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        r = client.chat.completions.create(model=MODEL, messages=hi["messages"], max_tokens=8)
        assert r.choices[0].message.content == base.tokenizer.decode(want, skip_special_tokens=True)


def test_a_tampered_link_is_a_502_at_the_gateway_not_a_failover(base) -> None:
    from fastapi.testclient import TestClient

    from edgelam.infer.gateway import create_gateway

    def tampered(ids, n, eos):
        raise IntegrityError("edge1: the answer's MAC does not verify")
        yield 0

    r = TestClient(create_gateway(tampered, base.tokenizer, MODEL)).post("/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 502 and r.json()["error"]["type"] == "link_integrity_error"
    assert "MAC does not verify" in r.json()["error"]["message"]


# --- last: kills edge1 ---

def test_signed_generation_equals_unsigned_and_survives_a_killed_node(world, base) -> None:
    """Token for token the same answer as unsigned single-process decoding through signed links, with a
    real SIGKILL mid-generation and failover replaying under new sequence numbers to a spare over TLS."""
    ring, edge1, edge1b, edge2 = world["ring"], world["edge1"], world["spare"], world["edge2"]
    signed = lambda svc: HttpTransport(svc.url, svc.node, signer=Signer(ring, "device"), peer=svc.node,  # noqa: E731
                                       ca=str(world["tls"].ca))
    local = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec))])  # noqa: E731
    pipe = Pipeline(local(ModuleSpec("embed")), [Stage("blocks 0..1", [signed(edge1), signed(edge1b)]),
                                                 Stage("blocks 2..3", [signed(edge2)])], local(ModuleSpec("head")))
    ids = prompt_ids(base.tokenizer, "Name three colours.")
    gen, got = Generation(len(ids)), []
    for i, token in enumerate(pipe.stream(ids, 12, gen=gen)):
        got.append(token)
        if i == 4:
            edge1.kill()
    for st in pipe.blocks:
        for t in st.candidates:
            t.client.close()
    assert got == reference(base, ids, 12)
    assert [(f["from"], f["to"], f["replayed_chunks"]) for f in gen.failovers] == [("edge1", "edge1b", 5)]


