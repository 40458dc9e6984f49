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
    links:
      - {a: device, b: edge1, rtt_ms: 10, rate_mbps: 50}
      - {a: device, b: edge2, rtt_ms: 10, rate_mbps: 50}
    placement: auto              # or {edge1: [0, 2], edge2: [2, 4]}
    replicas: 1                  # services per block range (more: failover targets)

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
from collections.abc import Iterator
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


def load_topology(path: str | os.PathLike[str]) -> Topology:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"topology file '{p}' not found")
    data = yaml.safe_load(p.read_text()) or {}
    unknown = sorted(set(data) - ALLOWED)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in topology {p}; allowed: {sorted(ALLOWED)}")
    if data.get("mode", "pipeline") != "pipeline":
        raise ConfigError(f"topology {p}: mode '{data.get('mode')}' is not supported; use pipeline")
    try:
        nodes = [Node(str(n["name"]), float(n.get("memory_gb", 1e9)) * 1e9, float(n["flops_per_s"])) for n in data["nodes"]]
        links = {(str(ln["a"]), str(ln["b"])): Link(float(ln["rtt_ms"]) / 1e3, float(ln["rate_mbps"]) * 1e6)
                 for ln in data.get("links", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"topology {p}: nodes need name and flops_per_s (memory_gb optional), links a, b, rtt_ms, "
                          f"rate_mbps ({type(exc).__name__}: {exc})") from None
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
    return Topology(str(data.get("name", p.stem)), str(data.get("model", "tiny-varied")), "pipeline", nodes, links,
                    placement, replicas, int(data.get("max_new_tokens", 16)), str(data.get("wire_dtype", "float32")),
                    bool(data.get("emulate_links", True)), float(data.get("hop_overhead_ms", 0.0)))


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
    try:
        for node, a, b in pl.ranges:
            for _ in range(topo.replicas):
                services.append(start_service(topo.model, f"blocks:{a}:{b}", node, topo.wire_dtype))
        wait_ready(services)
        yield services
    finally:
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
    from edgelam.infer.client import HttpTransport, LinkShaper, LocalTransport, Stage
    from edgelam.infer.modules import ModuleHost, ModuleSpec
    from edgelam.infer.pipeline import Pipeline

    embed = Stage("embed (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("embed")), "device")])
    head = Stage("head (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("head")), "device")])
    stages = []
    for node, a, b in pl.ranges:
        link = None
        if topo.emulate_links:
            ln = topo.links.get(("device", node)) or topo.links.get((node, "device"))
            if ln is not None:
                link = LinkShaper(ln.rtt_s, ln.rate_bps)
        cands = [HttpTransport(s.url, f"{node}#{i}", link, wire_dtype=topo.wire_dtype)
                 for i, s in enumerate(svc for svc in services if svc.module == f"blocks:{a}:{b}")]
        stages.append(Stage(f"blocks {a}..{b - 1} ({node})", cands))
    return Pipeline(embed, stages, head, adapter)
