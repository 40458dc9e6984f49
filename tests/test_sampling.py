"""Sampling (temperature, top-p, top-k, seed, stop): the maths by hand, speculative sampling's output
distribution against the target's (with controls that must fail), the same seed giving the same tokens
in every topology (real services, a real kill -9), greedy left as it was, and the gateway's options."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from scipy import stats

from edgelam.infer import sampling as S
from edgelam.infer.client import LocalTransport, Stage
from edgelam.infer.gateway import create_gateway
from edgelam.infer.modules import ModuleError, ModuleHost, ModuleSpec
from edgelam.infer.multi_access import MultiAccess
from edgelam.infer.pipeline import Pipeline, prompt_ids
from edgelam.infer.sampling import Sampling
from edgelam.infer.speculative import AdaptiveGamma, Escalation, Speculative
from edgelam.infer.topology import free_port, load_topology, open_topology
from edgelam.models.load import load_base

MODEL = "tiny-varied"
PROMPT = "Tell me a story."


@pytest.fixture(scope="module")
def base():
    return load_base(MODEL, "float32", 0)


def local(spec: str) -> LocalTransport:
    return LocalTransport(ModuleHost(MODEL, ModuleSpec.parse(spec)), spec)


# --- the maths, worked out by hand ---

def test_temperature_top_k_top_p_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(S.process(logits, Sampling(1.0)), torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    # top_p 0.8: 0.5 + 0.3 reach 0.8, so 0.15 and 0.05 go; 0.81 needs the third
    assert torch.allclose(S.process(logits, Sampling(1.0, 0.8)), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    assert torch.allclose(S.process(logits, Sampling(1.0, 0.81)), torch.tensor([[0.5, 0.3, 0.15, 0]], dtype=torch.float64) / 0.95)
    assert torch.allclose(S.process(logits, Sampling(1.0, 1.0, 2)), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    # temperature 0.5 squares the probabilities before renormalising: 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)
    assert float(S.process(logits, Sampling(0.5))[0, 0]) == pytest.approx(0.25 / 0.365)
    # inverse CDF in vocabulary order, never a zero-weight token
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    assert [S.draw(probs, u) for u in (0.0, 0.19, 0.2, 0.69, 0.7, 0.999)] == [0, 0, 2, 2, 3, 3]


def test_proposal_is_exact_integers_and_the_rejection_rule_by_hand() -> None:
    q = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    ids, weights = S.proposal(q, support=3)
    assert ids.tolist() == [0, 1, 2] and weights.tolist() == [2**23, 2**22, 2**22]  # floor(q * 2^24)
    assert ids.dtype == weights.dtype == torch.int32  # integers: exact on any wire dtype
    assert [S.draw_proposal(ids, weights, u) for u in (0.0, 0.49, 0.5, 0.75)] == [0, 0, 1, 2]
    # p = (0.2, 0.1, 0.7, 0): draft 0 (q 0.5) is kept iff u_accept * 0.5 < 0.2; at a rejection the token comes
    # from max(0, p - q) = (0, 0, 0.45, 0): token 2 whatever u_sample is
    p = torch.tensor([[0.2, 0.1, 0.7, 0.0]], dtype=torch.float64)
    for seed in range(20):
        kept = S.uniform(seed, "accept", 9) * 0.5 < 0.2
        assert S.verify(p, [0], ids[None], weights[None], seed, 9) == ((1, -1) if kept else (0, 2))
    # draft 2 (q 0.25 < p 0.7) is always kept
    assert all(S.verify(p, [2], ids[None], weights[None], seed, 9) == (1, -1) for seed in range(20))
    # uniforms depend on (seed, purpose, position) only
    assert S.uniform(5, "sample", 3) == S.uniform(5, "sample", 3) != S.uniform(5, "draft", 3) != S.uniform(6, "sample", 3)


# --- speculative sampling has exactly the target's distribution ---

def first_tokens(sample: Any, seeds: range) -> list[tuple[int, ...]]:
    return [tuple(sample(seed)) for seed in seeds]


def exact_distribution(host: ModuleHost, ids: list[int], s: Sampling, tokens: int) -> dict[tuple[int, ...], float]:
    """P(first ``tokens`` tokens) under the target's processed distribution, by enumeration."""
    def probs(seq: list[int]) -> torch.Tensor:
        out = host.forward({"input_ids": torch.tensor([seq])}, {"session": "exact", "position": 0, "return_logits": True})
        return S.process(out[0]["logits"][0, -1:], s)[0]

    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):
        dist = {prefix + (t,): pr * float(p[t]) for prefix, pr in dist.items()
                for p in [probs(ids + list(prefix))] for t in torch.nonzero(p).flatten().tolist()}
    return dist


def chi2_pvalue(samples: list[tuple[int, ...]], dist: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit: categories expected >= 5 times, the rest (outside the support too) pooled."""
    n, counts = len(samples), Counter(samples)
    big = sorted((c for c in dist if dist[c] * n >= 5), key=lambda c: -dist[c])
    observed = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    expected = [dist[c] * n for c in big] + [n - sum(dist[c] * n for c in big)]
    if expected[-1] < 5:  # pool the remainder with the least likely category
        observed[-2:], expected[-2:] = [sum(observed[-2:])], [sum(expected[-2:])]
    return float(stats.chisquare(observed, expected).pvalue)


def test_speculative_sampling_has_the_targets_distribution(base) -> None:
    """Fixed seeds 0..N-1 (deterministic). The draft (first 2 of 4 blocks) is far from the target (total
    variation 0.45 at the first token), so drafts are often rejected; the output must still fit the
    target's exact distribution of the first two tokens, while two wrong samplers must not fit."""
    ids = list(base.tokenizer(PROMPT)["input_ids"])
    s = lambda seed: Sampling(1.0, 1.0, 5, seed)
    exact = exact_distribution(ModuleHost(MODEL, ModuleSpec("full")), ids, s(0), 2)
    spec = Speculative(local("full:2"), local("full"), AdaptiveGamma(fixed=1))
    target, draft = MultiAccess([local("full")]), MultiAccess([local("full:2")])
    seeds = range(600)
    got = first_tokens(lambda seed: spec.generate(ids, 2, sampling=s(seed)).tokens, seeds)
    plain = first_tokens(lambda seed: target.stream(ids, 2, sampling=s(seed)), seeds)
    # the control: accepting every draft without the ratio p/q emits the draft's own samples
    accept_all = first_tokens(lambda seed: draft.stream(ids, 2, sampling=s(seed)), seeds)
    assert set(got) <= set(exact) and set(plain) <= set(exact)  # never a token top-k removed
    assert chi2_pvalue(got, exact) > 1e-3 and chi2_pvalue(plain, exact) > 1e-3
    assert chi2_pvalue(accept_all, exact) < 1e-6
    # speculative and plain sampling side by side (two-sample chi-square over the common categories)
    cats = [c for c in exact if exact[c] * len(seeds) >= 5]
    table = [[Counter(got)[c] for c in cats], [Counter(plain)[c] for c in cats]]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # a second control, the classic bug: at a rejection draw from p instead of norm(max(0, p - q))
    p0 = torch.tensor([sum(v for k, v in exact.items() if k[0] == t) for t in range(259)], dtype=torch.float64)
    q0 = S.process(ModuleHost(MODEL, ModuleSpec.parse("full:2")).forward(
        {"input_ids": torch.tensor([ids])}, {"session": "q", "position": 0, "return_logits": True})[0]["logits"][0, -1:],
        s(0))[0]
    q_ids, q_w = S.proposal(q0)

    def wrong_residual(seed: int) -> tuple[int]:
        x = S.draw_proposal(q_ids, q_w, S.uniform(seed, "draft", len(ids)))
        q_x = int(q_w[q_ids == x].sum()) / int(q_w.sum())
        kept = S.uniform(seed, "accept", len(ids)) * q_x < float(p0[x])
        return (x,) if kept else (S.draw(p0, S.uniform(seed, "sample", len(ids))),)

    first = {(t,): float(p0[t]) for t in torch.nonzero(p0).flatten().tolist()}
    assert chi2_pvalue([g[:1] for g in got], first) > 1e-3
    assert chi2_pvalue([wrong_residual(seed) for seed in seeds], first) < 1e-6


def test_speculative_sampling_with_q_cut_to_64_tokens_fits_the_first_token(base) -> None:
    """A hot request: top-p keeps 157 of the draft's tokens, q travels as its 64 most likely (78 % of its
    mass); the verifier reads that q, so the output is still the target's distribution."""
    ids = list(base.tokenizer(PROMPT)["input_ids"])
    s = lambda seed: Sampling(1.2, 0.95, 0, seed)
    exact = exact_distribution(ModuleHost(MODEL, ModuleSpec("full")), ids, s(0), 1)
    q = S.process(ModuleHost(MODEL, ModuleSpec.parse("full:3")).forward(
        {"input_ids": torch.tensor([ids])}, {"session": "q", "position": 0, "return_logits": True})[0]["logits"][0, -1:],
        s(0))[0]
    assert int((q > 0).sum()) > S.PROPOSAL_SUPPORT and len(S.proposal(q)[0]) == S.PROPOSAL_SUPPORT
    spec = Speculative(local("full:3"), local("full"), AdaptiveGamma(fixed=2))
    got = first_tokens(lambda seed: spec.generate(ids, 1, sampling=s(seed)).tokens, range(800))
    assert set(got) <= set(exact) and chi2_pvalue(got, exact) > 1e-3


# --- the same seed gives the same tokens, in every topology (real services), failover included ---

NODES = "nodes: [{name: edge1, flops_per_s: 1.0e11}, {name: edge2, flops_per_s: 1.0e11}]\n"
TOPOLOGIES = {  # the fewest services that show each mode, and a spare where the mode fails over
    "pipeline": "mode: pipeline\nreplicas: 2\nplacement: {edge1: [0, 4]}\n",
    "speculative": "mode: speculative\ntarget: {node: edge1}\ndraft: 'full:2'\ngamma: adaptive\n",
    "escalation": "mode: escalation\ntiers: [{node: device, module: 'full:1', threshold: 0.15}, {node: edge1, module: full}]\n",
    "multi_access": "mode: multi_access\nservers: [edge1, edge2]\n",
}


def victims(runner: Any, mode: str) -> list[Any]:
    """The service to kill -9 mid-answer where the topology has a spare (none for the others)."""
    if mode == "pipeline":
        return [s for s in runner.services if s.node == "edge1"]
    if mode == "multi_access":
        return [s for s in runner.services if s.node == runner.report()["routes"][-1]]
    return []


@pytest.mark.parametrize("mode", list(TOPOLOGIES))
def test_the_same_seed_gives_the_same_tokens_in_every_topology(base, tmp_path, mode) -> None:
    path = tmp_path / f"{mode}.yaml"
    path.write_text(f"model: {MODEL}\nemulate_links: true\nlinks: [{{a: device, b: edge1, rtt_ms: 4, rate_mbps: 50}}]\n"
                    f"{NODES}{TOPOLOGIES[mode]}")
    topo = load_topology(path)
    ids = prompt_ids(base.tokenizer, "Hello")
    s = Sampling(0.8, 0.95, 40, 1234)
    with open_topology(topo, base.model.config) as runner:
        greedy = list(runner.stream(ids, 10, None))
        first = list(runner.stream(ids, 10, None, sampling=s))
        other = list(runner.stream(ids, 10, None, sampling=Sampling(0.8, 0.95, 40, 99)))
        top1 = list(runner.stream(ids, 10, None, sampling=Sampling(1.0, 1.0, 1, 5)))  # top-k 1 is greedy
        again, killed = [], []
        for i, tok in enumerate(runner.stream(ids, 10, None, sampling=s)):
            again.append(tok)
            if i == 3:  # the same seed again, a service killed mid-answer where a spare takes over
                killed = victims(runner, topo.mode)
                for svc in killed:
                    svc.kill()
        report = runner.report()
    assert again == first and other != first and top1 == greedy
    assert bool(killed) == bool(report.get("failovers"))  # the kill really happened and was survived


def test_top_k_1_is_greedy_for_every_coordinator(base) -> None:
    """In process: the sampling path with top-k 1 gives the greedy tokens, bit for bit."""
    ids = prompt_ids(base.tokenizer, "Tell me a story.")
    one = Sampling(1.3, 0.5, 1, 77)
    stage = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec), str(spec))])
    pipe = Pipeline(stage(ModuleSpec("embed")), [stage(ModuleSpec("blocks", 0, 4))], stage(ModuleSpec("head")))
    assert pipe.generate(ids, 12, sampling=one).tokens == pipe.generate(ids, 12).tokens
    spec = Speculative(local("full:2"), local("full"), AdaptiveGamma(fixed=3))
    assert spec.generate(ids, 12, sampling=one).tokens == spec.generate(ids, 12).tokens
    tiers = [("device", local("full:1")), ("edge", local("full:3")), ("cloud", local("full"))]
    esc = Escalation(tiers, [0.05, 0.05])
    assert esc.generate(ids, 12, sampling=one).tokens == esc.generate(ids, 12).tokens
    ma = MultiAccess([local("full")])
    assert list(ma.stream(ids, 12, sampling=one)) == list(ma.stream(ids, 12))


def test_a_service_refuses_malformed_sampling_metadata() -> None:
    host = ModuleHost(MODEL, ModuleSpec("full"))
    ids = torch.tensor([[5, 6, 7]])
    good = Sampling(0.7, 0.9, 0, 1).meta(3)
    cases = [({**good, "temperature": 3}, "temperature must be a number between 0 and 2"),
             ({**good, "at": "x"}, "'at' must be an integer >= 1"), ({**good, "rows": 5}, "'rows' an integer in [1, at]"),
             ({**good, "draw": "draft", "rows": 2}, "(1 for a draft)"), ("hot", "'sampling' must be an object")]
    for meta, words in cases:
        with pytest.raises(ModuleError, match="sampling: ") as err:
            host.forward({"input_ids": ids}, {"session": "s", "position": 0, "sampling": meta})
        assert err.value.status == 400 and words in str(err.value)
    verify = {"input_ids": ids, "draft_ids": torch.tensor([[7, 9]]), "q_ids": torch.tensor([[[7], [9]]]),
              "q_weights": torch.tensor([[[1], [1]]])}
    assert "accepted" in host.forward(verify, {"session": "v", "position": 0, "sampling": {**good, "rows": 2}})[0]
    for bad, words in [({"q_weights": torch.tensor([[[0], [1]]])}, "some > 0 per row"),
                       ({"draft_ids": torch.tensor([[6, 9]])}, "must be the drafts"),
                       ({"q_ids": torch.tensor([[[7], [900]]])}, "must lie in [0, 259)")]:
        with pytest.raises(ModuleError, match="sampling: ") as err:
            host.forward({**verify, **bad}, {"session": "v", "position": 0, "sampling": {**good, "rows": 2}})
        assert words in str(err.value)


# --- the gateway: options, stop sequences, errors ---

@pytest.fixture(scope="module")
def gateway(base) -> TestClient:
    stage = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec), str(spec))])
    pipe = Pipeline(stage(ModuleSpec("embed")), [stage(ModuleSpec("blocks", 0, 4))], stage(ModuleSpec("head")))
    return TestClient(create_gateway(pipe.stream, base.tokenizer, MODEL, 16, 64, 1024), raise_server_exceptions=False)


def ask(gw: TestClient, kind: str, stream: bool, **options: Any) -> tuple[str, str, list[str]]:
    """(text, finish_reason, streamed deltas) of one request."""
    body = {"max_tokens": 32, **options, "stream": stream}
    body.update({"messages": [{"role": "user", "content": "Once upon a time"}]} if kind == "chat"
                else {"prompt": "Once upon a time"})
    r = gw.post("/v1/chat/completions" if kind == "chat" else "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if kind == "chat" else choice["text"], choice["finish_reason"], []
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    deltas = [c["delta"].get("content", "") if kind == "chat" else c["text"] for c in choices]
    return "".join(deltas), choices[-1]["finish_reason"], deltas


def split_stop(text: str) -> tuple[str, int]:
    """A stop sequence of two characters from ``text`` and where it first occurs: the byte tokenizer makes
    every character at least one token, so it is split across tokens."""
    for j in range(1, len(text) - 1):
        stop = text[j: j + 2]
        if "\ufffd" not in stop and text.find(stop) == j:
            return stop, j
    raise AssertionError(f"no usable stop sequence in {text!r}")


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_temperature_0_is_greedy_and_a_seed_reproduces_through_the_gateway(gateway, kind) -> None:
    greedy, finish, _ = ask(gateway, kind, False)
    assert finish == "length" and ask(gateway, kind, False, temperature=0, seed=5, top_p=0.3)[0] == greedy
    assert ask(gateway, kind, False, temperature=1, top_k=1)[0] == greedy
    hot = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    first = ask(gateway, kind, False, seed=7, **hot)[0]
    assert first != greedy and ask(gateway, kind, False, seed=7, **hot)[0] == first
    assert ask(gateway, kind, True, seed=7, **hot)[0] == first  # streamed: the same text
    assert ask(gateway, kind, False, seed=8, **hot)[0] != first
    assert ask(gateway, kind, False, **hot)[0] != ask(gateway, kind, False, **hot)[0]  # no seed: a random one
    assert ask(gateway, kind, False, top_p=0.9, seed=7)[0] != greedy  # top_p alone samples (temperature 1)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_stop_sequences_end_the_answer_and_never_leak(gateway, kind, stream) -> None:
    for options in ({}, {"temperature": 0.9, "seed": 3}):
        full, _, _ = ask(gateway, kind, False, **options)
        stop, at = split_stop(full)
        text, finish, deltas = ask(gateway, kind, stream, stop=stop, **options)
        assert (text, finish) == (full[:at], "stop")  # streamed: the deltas join to it, no part of stop leaked
        assert not stream or len(deltas) > 1
        text, finish, _ = ask(gateway, kind, stream, stop=["\u2603\u2603", stop], **options)
        assert (text, finish) == (full[:at], "stop")
        # a stop sequence whose first character occurs but which never completes: held back, then released
        text, finish, _ = ask(gateway, kind, stream, stop=full[at] + "\u2603", **options)
        assert (text, finish) == (full, "length")


BAD = [("temperature", -0.1, "temperature must be a number between 0 and 2"),
       ("temperature", 2.5, "temperature must be a number between 0 and 2"),
       ("temperature", "hot", "temperature must be a number between 0 and 2"),
       ("top_p", 0, "top_p must be a number in (0, 1]"), ("top_p", 1.5, "top_p must be a number in (0, 1]"),
       ("top_k", -1, "top_k must be an integer >= 0"), ("top_k", 2.5, "top_k must be an integer >= 0"),
       ("top_k", True, "top_k must be an integer >= 0"), ("seed", 1.5, "seed must be an integer"),
       ("seed", "7", "seed must be an integer"), ("stop", 5, "stop must be a string or a list of at most 4"),
       ("stop", ["a", "b", "c", "d", "e"], "stop must be a string or a list of at most 4"),
       ("stop", [""], "non-empty strings"), ("stop", [1], "stop must be a string or a list")]


@pytest.mark.parametrize("field,value,words", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_sampling_values_are_400_naming_the_field(gateway, field, value, words) -> None:
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        r = gateway.post(path, json={**body, field: value})
        error = r.json()["error"]
        assert r.status_code == 400 and words in error["message"] and error["param"] == field, r.text
        assert error["type"] == "invalid_request_error"


def test_the_openai_client_samples_through_a_real_speculative_gateway(repo) -> None:
    from openai import BadRequestError, OpenAI

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgelam.cli", "gateway", "--topology", "configs/tiny_speculative.yaml",
                             "--port", str(port)], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        msgs = [{"role": "user", "content": "Hello"}]
        kw: dict[str, Any] = {"model": MODEL, "messages": msgs, "max_tokens": 16, "temperature": 0.9, "top_p": 0.95,
                              "seed": 11, "extra_body": {"top_k": 40}}
        full = client.chat.completions.create(**kw).choices[0].message.content
        assert client.chat.completions.create(**kw).choices[0].message.content == full
        assert client.chat.completions.create(**{**kw, "seed": 12}).choices[0].message.content != full
        stop, at = split_stop(full)
        r = client.chat.completions.create(**kw, stop=[stop])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (full[:at], "stop")
        chunks = list(client.chat.completions.create(**kw, stop=[stop], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:at]
        assert chunks[-1].choices[0].finish_reason == "stop"
        with pytest.raises(BadRequestError, match="temperature must be a number between 0 and 2"):
            client.chat.completions.create(**{**kw, "temperature": 2.5})
    finally:
        proc.terminate()
        proc.wait(timeout=20)
