"""Server-to-server push (infer/push.py) and thread budgets (infer/threads.py) on real services."""

from __future__ import annotations

import httpx
import pytest
import torch

from edgelam.infer.client import HttpTransport, LocalTransport, ModuleError, Stage
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Generation, Pipeline, prompt_ids
from edgelam.infer.push import Hop, PushChain, parse_hops
from edgelam.infer.threads import Budget, budget_of, parse_cpus
from edgelam.infer.topology import start_service, stop_services, wait_ready
from edgelam.models.load import load_base

MODEL = "tiny-varied"


@pytest.fixture(scope="module")
def services():
    """blocks 2..3 twice (a primary and a spare), then blocks 0..1 allowed to push to both, one thread."""
    second = [start_service(MODEL, "blocks:2:4", n) for n in ("edge2", "edge2b")]
    started = list(second)
    try:
        first = start_service(MODEL, "blocks:0:2", "edge1",
                              extra=["--threads=1", *[f"--push-to={s.url}" for s in second]])
        started.append(first)
        wait_ready(started)
        yield first, second
    finally:
        stop_services(started)


def reference(ids: list[int], n: int) -> list[int]:
    base = load_base(MODEL, "float32", 0)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(base.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def local(spec: ModuleSpec) -> Stage:
    return Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec))])


def pipeline(first, second, push: bool) -> Pipeline:
    stages = [Stage("blocks 0..1", [HttpTransport(first.url, "edge1")]),
              Stage("blocks 2..3", [HttpTransport(s.url, s.node) for s in second])]
    chain = PushChain(stages, lambda a, b: Hop(b.url, b.name, 0.002, 1e9)) if push else None
    return Pipeline(local(ModuleSpec("embed")), stages, local(ModuleSpec("head")), chain=chain)


def test_pushed_chain_answers_like_relaying_with_one_device_call_per_token(services) -> None:
    first, second = services
    ids = prompt_ids(load_base(MODEL, "float32", 0).tokenizer, "Name three colours.")
    want = reference(ids, 10)
    relay, push = pipeline(first, second, False), pipeline(first, second, True)
    assert relay.generate(ids, 10).tokens == want
    gen = push.generate(ids, 10)
    assert gen.tokens == want and gen.failovers == []
    dev = [st.candidates[0].stats.calls for st in push.blocks]
    assert dev == [10, 0]  # the device called only the first stage; it pushed to the second
    hops = push.chain.hops
    assert len(hops) == 10 and {h["to"] for h in hops} == {"edge2"} and all(h["calls"] == 1 for h in hops)
    assert all(h["bytes_up"] > 64 * 4 and h["link_seconds"] >= 0.002 for h in hops)  # a hidden state, the emulated hop


def test_push_survives_the_next_stage_dying_by_relaying(services) -> None:
    first, second = services
    ids = prompt_ids(load_base(MODEL, "float32", 0).tokenizer, "Count to five.")
    want = reference(ids, 12)
    pipe = pipeline(first, second, True)
    gen, got = Generation(len(ids)), []
    for i, tok in enumerate(pipe.stream(ids, 12, gen=gen)):
        got.append(tok)
        if i == 4:
            second[0].kill()  # a real SIGKILL of the pushed-to service mid-generation
    assert got == want
    push_fail = [f for f in gen.failovers if f["stage"] == "push chain"]
    assert len(push_fail) == 1 and push_fail[0]["replayed_chunks"] == 5  # prompt + 4 tokens, rebuilt by relaying
    assert "edge2" in push_fail[0]["reason"]
    assert any(f["from"] == "edge2" and f["to"] == "edge2b" for f in gen.failovers)
    # the next generation pushes again, to the spare the relay switched to
    gen2 = pipe.generate(ids, 4)
    assert gen2.tokens == want[:4] and not [f for f in gen2.failovers if f["stage"] == "push chain"]
    assert pipe.chain.hops[-1]["to"] == "edge2b"


def test_push_only_to_allowed_services_and_well_formed_hops(services) -> None:
    first, second = services
    h = torch.randn(1, 3, 64)
    # the second stage was started without --push-to: it pushes nowhere
    with pytest.raises(ModuleError, match=r"push to http://127.0.0.1:1 refused.*--push-to") as exc:
        HttpTransport(second[1].url).call({"hidden": h}, {"session": "a", "position": 0,
                                                          "push": [{"url": "http://127.0.0.1:1", "node": "x"}]})
    assert exc.value.status == 400
    for bad, msg in (("nope", "push must be a list"), ([{"url": "file:///etc/passwd"}], "http"),
                     ([{"url": second[1].url, "rtt_s": -1}], "rtt_s"), ([{"url": second[1].url, "extra": 1}], "object")):
        with pytest.raises(ModuleError, match=msg) as exc:
            HttpTransport(first.url).call({"hidden": h}, {"session": "b", "position": 0, "push": bad})
        assert exc.value.status == 400
    info = httpx.get(f"{first.url}/info").json()
    assert info["threads"]["threads"] == 1 and info["threads"]["omp_wait_policy"] == "PASSIVE"
    assert info["push_to"] == sorted(s.url for s in second)
    assert parse_hops(None) == [] and parse_hops([{"url": "http://a:1/", "node": "n"}]) == [Hop("http://a:1", "n")]


def test_thread_budgets_parse_and_refuse_cores_that_do_not_exist() -> None:
    assert parse_cpus("0", "--cpus") == (0,)
    assert budget_of({"threads": 2}, "node a") == Budget(2, None)
    assert Budget(2, (0,)).args() == ["--threads=2", "--cpus=0"]
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        budget_of({"threads": 0}, "node a")
    with pytest.raises(ValueError, match=r"node a: cpus \[4096\] name cores this process cannot use"):
        budget_of({"cpus": [4096]}, "node a")
    with pytest.raises(ValueError, match="core numbers such as 0,1 or 0-3"):
        parse_cpus("1-0", "--cpus")


TOPOLOGY = """model: tiny-varied
mode: pipeline
push: {push}
nodes:
  - {{name: edge1, flops_per_s: 1.0e11, threads: 1}}
  - {{name: edge2, flops_per_s: 1.0e11, cpus: "0"}}
links:
  - {{a: device, b: edge1, rtt_ms: 4, rate_mbps: 100}}
  - {{a: device, b: edge2, rtt_ms: 4, rate_mbps: 100}}
{backhaul}placement: {{edge1: [0, 2], edge2: [2, 4]}}
"""


def write(tmp_path, push: str, backhaul: bool = True, **node: str):
    from edgelam.infer.topology import load_topology

    text = TOPOLOGY.format(push=push, backhaul="  - {a: edge1, b: edge2, rtt_ms: 1, rate_mbps: 1000}\n" if backhaul else "")
    for old, new in node.items():
        text = text.replace(old, new)
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    return load_topology(path)


def test_topology_pushes_over_its_backhaul_with_each_node_s_thread_budget(tmp_path) -> None:
    from edgelam.infer.placement import problem_for_model
    from edgelam.infer.push import relay_model
    from edgelam.infer.topology import open_topology

    base = load_base(MODEL, "float32", 0)
    topo = write(tmp_path, "auto")
    assert relay_model(topo) == "push" and relay_model(write(tmp_path, "auto", backhaul=False)) == "star"
    ids = prompt_ids(base.tokenizer, "Hello")
    with open_topology(topo, base.model.config) as runner:
        got = list(runner.stream(ids, 6, None))
        report = runner.report()
        infos = {s.node: httpx.get(f"{s.url}/info").json() for s in runner.services}
    assert got == reference(ids, 6)
    assert [h["to"] for h in report["push_hops"]] == ["edge2"] * 6 and report["failovers"] == []
    assert all(h["link_seconds"] >= 0.001 for h in report["push_hops"])  # the 1 ms backhaul, emulated
    assert infos["edge1"]["threads"]["threads"] == 1 and infos["edge1"]["push_to"] == [
        s.url for s in runner.services if s.node == "edge2"]
    assert infos["edge2"]["threads"] == {"threads": 1, "cpus": [0], "omp_wait_policy": "PASSIVE"}
    # the planner prices the pushed chain: device <-> edge1 and edge1 <-> edge2 round trips, not device <-> each
    prob = problem_for_model(base.model.config, topo.nodes, topo.links, relay="push")
    assert runner.plan.network_s == pytest.approx(sum(prob.hop_s(a, b) + prob.hop_s(b, a)
                                                      for a, b in (("device", "edge1"), ("edge1", "edge2"))))


def test_topology_push_settings_are_checked(tmp_path) -> None:
    from edgelam.config import ConfigError
    from edgelam.infer.topology import make_plan, pushes

    base = load_base(MODEL, "float32", 0)
    topo = write(tmp_path, "true", backhaul=False)
    with pytest.raises(ConfigError, match=r"push: true needs a link between consecutive stages' nodes; add \{a: edge1, b: edge2"):
        pushes(topo, make_plan(topo, base.model.config))
    assert not pushes(write(tmp_path, "false"), make_plan(topo, base.model.config))
    with pytest.raises(ConfigError, match="push must be auto"):
        write(tmp_path, "sometimes")
    with pytest.raises(ConfigError, match="node edge1: threads must be an integer >= 1"):
        write(tmp_path, "auto", **{"threads: 1": "threads: 0"})
    with pytest.raises(ConfigError, match="node edge2: cpus must be core numbers"):
        write(tmp_path, "auto", **{'cpus: "0"': 'cpus: "x"'})
