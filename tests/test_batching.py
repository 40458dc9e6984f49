"""Continuous batching (infer/batching.py): concurrent sessions' decode steps in one forward."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from edgelam.infer.batching import decode_many, forward_many
from edgelam.infer.client import HttpTransport
from edgelam.infer.modules import ModuleError, ModuleHost, ModuleSpec
from edgelam.infer.pipeline import prompt_ids
from edgelam.infer.topology import start_service, stop_services, wait_ready
from edgelam.models.load import load_base

MODEL = "tiny-varied"
PROMPTS = ["Hello", "Name three colours please.", "2+2=", "Tell me a very long story about a dog and a cat."]


def reference(ids: list[int], n: int) -> list[int]:
    base = load_base(MODEL, "float32", 0)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(base.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def prompts() -> list[list[int]]:
    tok = load_base(MODEL, "float32", 0).tokenizer
    return [prompt_ids(tok, p) for p in PROMPTS]


def test_batched_steps_equal_one_session_steps_and_keep_each_cache() -> None:
    """Four sessions of different lengths, stepped together by ``forward_many`` and alone by a second
    host: the same hidden states (float tolerance), the same greedy tokens, caches of the right length."""
    ids = prompts()
    batched, alone = ModuleHost(MODEL, ModuleSpec("full")), ModuleHost(MODEL, ModuleSpec("full"))
    nxt = {}
    for k, p in enumerate(ids):
        for host in (batched, alone):
            out, _ = host.forward({"input_ids": torch.tensor([p])}, {"session": f"s{k}", "position": 0})
        nxt[k] = int(out["token_ids"][0, -1])
    want = {k: reference(p, 6) for k, p in enumerate(ids)}
    got: dict[int, list[int]] = {k: [nxt[k]] for k in nxt}
    for step in range(5):
        reqs = [({"input_ids": torch.tensor([[got[k][-1]]])}, {"session": f"s{k}", "position": len(ids[k]) + step,
                                                               "return_logits": False}) for k in got]
        results = forward_many(batched, reqs)
        for k, (t, m) in enumerate(reqs):
            single, _ = alone.forward(t, m)
            out, meta = results[k]
            assert meta == {"length": len(ids[k]) + step + 1}
            assert int(out["token_ids"][0, -1]) == int(single["token_ids"][0, -1])
            assert torch.allclose(out["top_prob"], single["top_prob"], atol=1e-5)
            got[k].append(int(out["token_ids"][0, -1]))
    assert got == want
    assert batched.stats["batches_total"] == 5 and batched.stats["batched_requests_total"] == 20
    assert all(batched.sessions[f"s{k}"].length == len(ids[k]) + 5 for k in range(4))


def test_what_is_not_a_decode_step_runs_alone_with_its_own_error() -> None:
    host = ModuleHost(MODEL, ModuleSpec("blocks", 0, 4))
    h = lambda n: torch.randn(1, n, host.hidden_size)  # noqa: E731
    for s in ("a", "b", "c"):
        host.forward({"hidden": h(3)}, {"session": s, "position": 0})
    reqs = [({"hidden": h(1)}, {"session": "a", "position": 3}),  # a decode step
            ({"hidden": h(1)}, {"session": "b", "position": 3}),  # a decode step
            ({"hidden": h(2)}, {"session": "c", "position": 3}),  # two tokens: alone
            ({"hidden": h(1)}, {"session": "x", "position": 5}),  # unknown session: 409, alone
            ({"hidden": h(1) * float("nan")}, {"session": "c", "position": 5})]  # NaN: 400
    res = forward_many(host, reqs)
    assert res[0][1] == {"length": 4} and res[1][1] == {"length": 4} and res[2][1] == {"length": 5}
    assert isinstance(res[3], ModuleError) and res[3].status == 409
    assert isinstance(res[4], ModuleError) and "NaN" in str(res[4])
    assert host.stats["batches_total"] == 1 and host.stats["batched_requests_total"] == 2
    # a batch whose sessions changed meanwhile leaves them to the one-request path
    assert decode_many(host, [({"hidden": h(1)}, {"session": "a", "position": 1})]) == [None]


@pytest.fixture(scope="module")
def service():
    svc = start_service(MODEL, "full", "edge")
    try:
        wait_ready([svc])
        yield svc
    finally:
        stop_services([svc])


def test_concurrent_clients_are_batched_by_the_service_and_answer_exactly(service) -> None:
    ids = prompts() * 2  # 8 clients
    want = [reference(p, 8) for p in ids]
    got: list[list[int] | None] = [None] * len(ids)
    start = threading.Barrier(len(ids))

    def client(k: int) -> None:
        tr = HttpTransport(service.url, f"c{k}")
        seq, out = list(ids[k]), []
        start.wait()
        pos, cur = 0, seq
        for _ in range(8):
            res, _ = tr.call({"input_ids": torch.tensor([cur])}, {"session": f"c{k}", "position": pos})
            tok = int(res["token_ids"][0, -1])
            out.append(tok)
            pos, cur = pos + len(cur), [tok]
        got[k] = out

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    metrics = httpx.get(f"{service.url}/metrics").text
    batched = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("edgelam_batched_requests_total")]
    assert batched and batched[0] > 0  # some steps shared a forward


def test_a_bad_sampling_field_fails_only_its_own_request_in_a_batch() -> None:
    from edgelam.infer.sampling import Sampling

    host = ModuleHost(MODEL, ModuleSpec("full"))
    for s in ("a", "b"):
        host.forward({"input_ids": torch.tensor([[5, 6, 7]])}, {"session": s, "position": 0})
    good = {"session": "a", "position": 3, "sampling": Sampling(0.8, 1.0, 0, 7).meta(4)}
    bad = {"session": "b", "position": 3, "sampling": {**Sampling(0.8, 1.0, 0, 7).meta(4), "top_p": 5}}
    res = forward_many(host, [({"input_ids": torch.tensor([[9]])}, good), ({"input_ids": torch.tensor([[9]])}, bad)])
    assert res[0][1] == {"length": 4} and host.stats["batches_total"] == 1
    assert isinstance(res[1], ModuleError) and "top_p" in str(res[1])
    alone = ModuleHost(MODEL, ModuleSpec("full"))
    alone.forward({"input_ids": torch.tensor([[5, 6, 7]])}, {"session": "a", "position": 0})
    want, _ = alone.forward({"input_ids": torch.tensor([[9]])}, good)
    assert torch.equal(res[0][0]["token_ids"], want["token_ids"])  # the same seed draws the same token
