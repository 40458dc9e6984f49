"""An inference topology file: the model, the nodes and links, the placement; launch it, run it, stop it.

    name: tiny_pipeline
    model: tiny-varied
    mode: pipeline
    max_new_tokens: 16
    wire_dtype: float32          # float16 halves hidden states on the wire
    emulate_links: true          # shape each call by its device <-> node link (see infer/client.py)
    nodes:                       # edge nodes; the device (coordinator) runs embed and head itself
      - {name: edge1, memory_gb: 1.0, flops_per_s: 1.0e11}
      - {name: edge2, memory_gb: 1.0, flops_per_s: 1.0e11}
    links:                       # rate_mbps, or distance_m (+ bandwidth_mhz, tx_power_dbm): the radio model's rate
      - {a: device, b: edge1, rtt_ms: 10, rate_mbps: 50}
      - {a: device, b: edge2, rtt_ms: 10, distance_m: 250, bandwidth_mhz: 10}
    placement: auto              # or {edge1: [0, 2], edge2: [2, 4]}
    replicas: 1                  # services per block range; replica i on the i-th next node (failover targets)

``launch`` starts one ``edgelam serve`` process per block range and replica on a free loopback
port, waits until each answers /ready, and stops them all on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from edgelam.config import ConfigError
from edgelam.infer.placement import Link, Node, Plan, evaluate, plan, problem_for_model

LINK_EMULATION = "transport shaping (each call waits RTT/2 + bytes/rate each way; tc netem needs CAP_NET_ADMIN)"


@dataclass(frozen=True)
class Topology:
    name: str
    model: str
    mode: str
    nodes: list[Node]
    links: dict[tuple[str, str], Link]
    placement: dict[str, tuple[int, int]] | None  # None: automatic
    replicas: int = 1
    max_new_tokens: int = 16
    wire_dtype: str = "float32"
    emulate_links: bool = True
    hop_overhead_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


ALLOWED = {"name", "model", "mode", "nodes", "links", "placement", "replicas", "max_new_tokens", "wire_dtype",
           "emulate_links", "hop_overhead_ms"}
MODE_KEYS = {"pipeline": set(), "speculative": {"target", "draft", "draft_model", "gamma", "gamma_max"},
             "escalation": {"tiers"}, "multi_access": {"servers", "seed"}}


def load_topology(path: str | os.PathLike[str]) -> Topology:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"topology file '{p}' not found")
    data = yaml.safe_load(p.read_text()) or {}
    mode = data.get("mode", "pipeline")
    if mode not in MODE_KEYS:
        raise ConfigError(f"topology {p}: mode '{mode}' must be one of {sorted(MODE_KEYS)}")
    unknown = sorted(set(data) - ALLOWED - MODE_KEYS[mode])
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in topology {p} (mode {mode}); allowed: {sorted(ALLOWED | MODE_KEYS[mode])}")
    try:
        nodes = [Node(str(n["name"]), float(n.get("memory_gb", 1e9)) * 1e9, float(n["flops_per_s"])) for n in data["nodes"]]
        links = {(str(ln["a"]), str(ln["b"])): parse_link(ln) for ln in data.get("links", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"topology {p}: nodes need name and flops_per_s (memory_gb optional), links a, b, rtt_ms and "
                          f"rate_mbps or distance_m ({type(exc).__name__}: {exc})") from None
    if not nodes:
        raise ConfigError(f"topology {p}: list at least one node")
    raw = data.get("placement", "auto")
    placement = None
    if raw != "auto":
        if not isinstance(raw, dict):
            raise ConfigError(f"topology {p}: placement must be 'auto' or a mapping node -> [start, end]")
        placement = {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
    replicas = int(data.get("replicas", 1))
    if replicas < 1:
        raise ConfigError(f"topology {p}: replicas must be >= 1")
    if data.get("wire_dtype", "float32") not in ("float32", "float16"):
        raise ConfigError(f"topology {p}: wire_dtype must be float32 or float16")
    extra = {k: data[k] for k in MODE_KEYS[mode] if k in data}
    names = {n.name for n in nodes} | {"device"}
    if mode == "speculative" and str((extra.get("target") or {}).get("node")) not in names:
        raise ConfigError(f"topology {p}: speculative mode needs target: {{node: NAME}} naming one of {sorted(names)}")
    if mode == "escalation":
        tiers = extra.get("tiers")
        if not isinstance(tiers, list) or len(tiers) < 2 or any(t.get("node") not in names for t in tiers):
            raise ConfigError(f"topology {p}: escalation needs tiers: a list of >= 2 {{node, module, threshold}} "
                              f"with nodes among {sorted(names)}")
    if mode == "multi_access" and (not isinstance(extra.get("servers"), list) or not extra["servers"]
                                   or any(s not in names for s in extra["servers"])):
        raise ConfigError(f"topology {p}: multi_access needs servers: a list of node names among {sorted(names)}")
    return Topology(str(data.get("name", p.stem)), str(data.get("model", "tiny-varied")), mode, nodes, links,
                    placement, replicas, int(data.get("max_new_tokens", 16)), str(data.get("wire_dtype", "float32")),
                    bool(data.get("emulate_links", True)), float(data.get("hop_overhead_ms", 0.0)), extra)


def radio_rate_bps(distance_m: float, bandwidth_hz: float = 10e6, tx_power_dbm: float = 23.0,
                   noise_figure_db: float = 7.0) -> float:
    """The uplink rate of the net/ link model at ``distance_m`` without fading: macro path loss
    128.1 + 37.6 log10(d/km), -174 dBm/Hz noise + noise figure, Shannon rate B log2(1 + SNR)."""
    from edgelam.net import channel

    gain = channel.db_to_linear(-channel.path_loss_macro_db(max(distance_m, 1.0)))
    snr = channel.snr_linear(channel.dbm_to_w(tx_power_dbm), gain, channel.noise_power_w(bandwidth_hz, -174.0, noise_figure_db))
    return channel.shannon_rate_bps(bandwidth_hz, snr)


def parse_link(ln: dict[str, Any]) -> Link:
    """``rate_mbps`` as given, or from the radio model: ``distance_m`` (+ ``bandwidth_mhz``, ``tx_power_dbm``)."""
    rtt = float(ln["rtt_ms"]) / 1e3
    if "rate_mbps" in ln:
        return Link(rtt, float(ln["rate_mbps"]) * 1e6)
    return Link(rtt, radio_rate_bps(float(ln["distance_m"]), float(ln.get("bandwidth_mhz", 10.0)) * 1e6,
                                    float(ln.get("tx_power_dbm", 23.0))))


def make_plan(topo: Topology, model_config: Any) -> Plan:
    bpv = 2 if topo.wire_dtype == "float16" else 4
    prob = problem_for_model(model_config, topo.nodes, topo.links, bytes_per_value=bpv, hop_overhead_s=topo.hop_overhead_ms / 1e3)
    if topo.placement is None:
        return plan(prob)
    ranges = sorted(((n, a, b) for n, (a, b) in topo.placement.items()), key=lambda r: r[1])
    names = {n.name for n in topo.nodes}
    bounds = [0] + [b for _, _, b in ranges]
    if any(n not in names for n, _, _ in ranges) or [a for _, a, _ in ranges] != bounds[:-1] or bounds[-1] != prob.num_blocks:
        raise ConfigError(f"placement {topo.placement} must name known nodes and cover blocks 0..{prob.num_blocks - 1} "
                          f"in contiguous ranges")
    return evaluate(prob, ranges)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    node: str
    module: str
    url: str
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def start_service(model: str, module: str, node: str, wire_dtype: str = "float32", extra: list[str] | None = None) -> Service:
    port = free_port()
    cmd = [sys.executable, "-m", "edgelam.cli", "serve", "--model", model, "--module", module, "--port", str(port),
           "--wire-dtype", wire_dtype, *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Service(node, module, f"http://127.0.0.1:{port}", proc)


def wait_ready(services: list[Service], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(services)
    while pending:
        for svc in list(pending):
            if svc.proc.poll() is not None:
                err = svc.proc.stderr.read().decode(errors="replace")[-2000:] if svc.proc.stderr else ""
                raise RuntimeError(f"service {svc.module} on {svc.node} exited with code {svc.proc.returncode}: {err}")
            try:
                if httpx.get(f"{svc.url}/ready", timeout=1.0).status_code == 200:
                    pending.remove(svc)
            except httpx.TransportError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"services not ready after {timeout_s:.0f} s: {[s.module for s in pending]}")
        if pending:
            time.sleep(0.1)


@contextlib.contextmanager
def launch(topo: Topology, pl: Plan) -> Iterator[list[Service]]:
    """Start every block service of the plan (``replicas`` per range), yield them, stop them."""
    services: list[Service] = []
    names = [n.name for n in topo.nodes]
    try:
        for node, a, b in pl.ranges:
            for i in range(topo.replicas):
                # replica i of a range sits on the i-th next node: a spare survives its primary's node leaving
                host = names[(names.index(node) + i) % len(names)]
                services.append(start_service(topo.model, f"blocks:{a}:{b}", host, topo.wire_dtype))
        wait_ready(services)
        yield services
    finally:
        stop_services(services)


def stop_services(services: list[Service]) -> None:
    """SIGTERM every service, then SIGKILL any still running after 10 s."""
    for svc in services:
        if svc.proc.poll() is None:
            svc.proc.terminate()
    for svc in services:
        try:
            svc.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            svc.kill()


def build_pipeline(topo: Topology, pl: Plan, services: list[Service], adapter: str | None = None) -> Any:
    """The device's coordinator: embed and head in process, one stage per block range whose
    candidates are that range's services (the first is used, the others are failover targets)."""
    from edgelam.infer.client import HttpTransport, LocalTransport, Stage
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.infer.pipeline import Pipeline

    embed = Stage("embed (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("embed")), "device")])
    head = Stage("head (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("head")), "device")])
    stages = []
    for node, a, b in pl.ranges:
        cands = [HttpTransport(s.url, f"{s.node}#{i}", link_to(topo, s.node), wire_dtype=topo.wire_dtype)
                 for i, s in enumerate(svc for svc in services if svc.module == f"blocks:{a}:{b}")]
        stages.append(Stage(f"blocks {a}..{b - 1} ({node})", cands))
    return Pipeline(embed, stages, head, adapter)


def link_to(topo: Topology, node: str) -> Any:
    from edgelam.infer.client import LinkShaper

    if not topo.emulate_links or node == "device":
        return None
    ln = topo.links.get(("device", node)) or topo.links.get((node, "device"))
    return LinkShaper(ln.rtt_s, ln.rate_bps) if ln is not None else None


@dataclass
class Runner:
    """A launched topology: ``stream(ids, max_new, eos)`` yields tokens; ``report()`` says what happened."""

    stream: Callable[[list[int], int, int | None], Iterator[int]]
    report: Callable[[], dict[str, Any]]
    services: list[Service]
    plan: Plan | None = None


@contextlib.contextmanager
def open_topology(topo: Topology, model_config: Any, adapter: str | None = None) -> Iterator[Runner]:
    """Start the services the topology's mode needs, build its coordinator, stop everything on exit."""
    from edgelam.infer.client import HttpTransport, LocalTransport
    from edgelam.infer.modules import ModuleHost, ModuleSpec

    def remote(svc: Service, name: str) -> HttpTransport:
        return HttpTransport(svc.url, name, link_to(topo, svc.node), wire_dtype=topo.wire_dtype)

    if topo.mode == "pipeline":
        pl = make_plan(topo, model_config)
        with launch(topo, pl) as services:
            pipe = build_pipeline(topo, pl, services, adapter)
            last: dict[str, Any] = {}

            def stream(ids: list[int], n: int, eos: int | None) -> Iterator[int]:
                from edgelam.infer.pipeline import Generation

                gen = Generation(len(ids))
                last["gen"] = gen
                yield from pipe.stream(ids, n, eos, gen)

            def report() -> dict[str, Any]:
                gen = last.get("gen")
                return {"stages": [t.stages for t in gen.timings] if gen else [],
                        "failovers": gen.failovers if gen else []}

            yield Runner(stream, report, services, pl)
        return
    services = []
    try:
        if topo.mode == "speculative":
            from edgelam.infer.speculative import AdaptiveGamma, Speculative, SpecStats

            node = topo.extra["target"]["node"]
            target_svc = [start_service(topo.model, "full", node, topo.wire_dtype) for _ in range(topo.replicas)]
            services += target_svc
            wait_ready(services)
            draft_model = topo.extra.get("draft_model", topo.model)
            draft = LocalTransport(ModuleHost(str(draft_model), ModuleSpec.parse(str(topo.extra.get("draft", "full")))), "device")
            gamma = topo.extra.get("gamma", "adaptive")
            ctrl = AdaptiveGamma(gamma_max=int(topo.extra.get("gamma_max", 8)), fixed=None if gamma == "adaptive" else int(gamma))
            spec = Speculative(draft, remote(target_svc[0], node), ctrl, adapter)
            stats: dict[str, SpecStats] = {}

            def stream(ids: list[int], n: int, eos: int | None) -> Iterator[int]:
                stats["last"] = SpecStats()
                yield from spec.stream(ids, n, eos, stats["last"])

            def report() -> dict[str, Any]:
                st = stats.get("last")
                return {} if st is None else {"rounds": st.rounds, "drafted": st.drafted, "accepted": st.accepted,
                                              "acceptance": st.acceptance, "gammas": st.gammas}

            yield Runner(stream, report, services)
        elif topo.mode == "escalation":
            from edgelam.infer.speculative import Escalation, EscalationStats

            tiers: list[tuple[str, Any]] = []
            for t in topo.extra["tiers"]:
                module = str(t.get("module", "full"))
                if t["node"] == "device":
                    tiers.append(("device", LocalTransport(ModuleHost(topo.model, ModuleSpec.parse(module)), "device")))
                else:
                    svc = start_service(topo.model, module, t["node"], topo.wire_dtype)
                    services.append(svc)
                    tiers.append((t["node"], svc))
            wait_ready(services)
            tiers = [(n, remote(x, n) if isinstance(x, Service) else x) for n, x in tiers]
            esc = Escalation(tiers, [float(t["threshold"]) for t in topo.extra["tiers"][:-1]], adapter)
            est: dict[str, EscalationStats] = {}

            def stream(ids: list[int], n: int, eos: int | None) -> Iterator[int]:
                est["last"] = EscalationStats([name for name, _ in tiers], [0] * len(tiers))
                yield from esc.stream(ids, n, eos, est["last"])

            def report() -> dict[str, Any]:
                st = est.get("last")
                return {} if st is None else {"served": dict(zip(st.tiers, st.served)), "shares": st.shares()}

            yield Runner(stream, report, services)
        else:  # multi_access
            from edgelam.infer.multi_access import MultiAccess

            for node in topo.extra["servers"]:
                services.append(start_service(topo.model, "full", node, topo.wire_dtype))
            wait_ready(services)
            ma = MultiAccess([remote(s, s.node) for s in services], seed=int(topo.extra.get("seed", 0)))

            def stream(ids: list[int], n: int, eos: int | None) -> Iterator[int]:
                yield from ma.stream(ids, n, eos, adapter)

            def report() -> dict[str, Any]:
                return {"routes": [services[i].node for i in ma.routes], "failovers": ma.failovers,
                        "calls": {s.node: ld.requests for s, ld in zip(services, ma.loads)}}

            yield Runner(stream, report, services)
    finally:
        stop_services(services)
