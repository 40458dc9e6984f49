"""Serving a trained predictor against the channel's coherence time (topology ``mode: predict``).

    name: tiny_channel_serving
    mode: predict
    run: runs/tiny_channel        # a channel- (or beam-) prediction run folder: adapter, config, held-out data
    requests: 30                  # predictions timed per placement (one user's past CSI each)
    speed_kmh: [30, 60, 120]      # speeds to hold the latency against (default: the run's speed range ends)
    carrier_ghz: 2.4              # default: the run's channels.carrier_ghz
    device_flops_per_s: 2.0e10    # the device's compute for the modelled latency
    nodes: [{name: edge, flops_per_s: 1.0e12}, {name: cloud, flops_per_s: 1.0e14}]
    links: [{a: device, b: edge, rtt_ms: 4, rate_mbps: 100}, {a: device, b: cloud, rtt_ms: 30, rate_mbps: 100}]

The predictor is served whole (``edgelam serve --module full``, built through its task from the
run's adapter) on the device (in process) and on every node (its own process, behind the
emulated link: RTT/2 + bytes/rate each way, ``client.LinkShaper``); real held-out samples are sent
one at a time. For each placement the table gives the measured latency (this machine's compute,
emulated link) and a modelled one (the forward FLOPs / the tier's FLOP/s, plus the link), and
says which placements answer within the coherence time T_c = 0.423 c / (v f_c) at each speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelam.channels.csi import coherence_time_s
from edgelam.config import ConfigError
from edgelam.config_checks import number
from edgelam.infer.client import HttpTransport, LinkShaper, LocalTransport
from edgelam.infer.launch import Service, start_service, wait_ready
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.placement import Link

PREDICT_KEYS = {"run", "requests", "speed_kmh", "carrier_ghz", "device_flops_per_s"}


def check_predict(extra: dict[str, Any], names: set[str], where: str) -> None:
    """The ``mode: predict`` keys, checked before anything starts."""
    run = extra.get("run")
    if not isinstance(run, str) or not (Path(run) / "adapter").is_dir() or not (Path(run) / "config.yaml").is_file():
        raise ConfigError(f"{where}: run must name a channel- or beam-prediction run folder (with adapter/ and "
                          f"config.yaml), e.g. runs/tiny_channel from `edgelam run configs/tiny_channel.yaml --out "
                          f"runs/tiny_channel`; got {run!r}")
    number(extra, "requests", 20, 1, where, integer=True)
    speeds = extra.get("speed_kmh", [])
    if not isinstance(speeds, list) or not all(isinstance(v, (int, float)) and v > 0 for v in speeds):
        raise ConfigError(f"{where}: speed_kmh must be a list of speeds > 0 km/h, got {speeds!r}")
    for key in ("carrier_ghz", "device_flops_per_s"):
        if key in extra:  # YAML 1.1 reads 2.0e10 as a string: keep the number
            extra[key] = number(extra, key, None, 0, where, strict=True)


@dataclass
class Tier:
    name: str
    transport: Any  # LocalTransport | HttpTransport
    link: Link | None
    flops_per_s: float


def _link(links: dict[tuple[str, str], Link], node: str) -> Link | None:
    return links.get(("device", node)) or links.get((node, "device"))


def held_out_inputs(cfg: Any, host: ModuleHost, n: int) -> list[dict[str, Any]]:
    """``n`` wire messages of one held-out sample each (the task's inputs only, not its targets)."""
    from edgelam.tasks import setup_task

    samples = [s for xs in setup_task(cfg).data.global_eval.values() for s in xs]
    if not samples:
        raise ConfigError("the run's data have no held-out samples to send")
    return [host.task.wire_inputs(host.task.collate([samples[i % len(samples)]])) for i in range(n)]


def time_tier(tier: Tier, inputs: list[dict[str, Any]]) -> list[float]:
    """Seconds per prediction through ``tier`` (two warm-up calls first, not counted)."""
    for msg in inputs[:2]:
        tier.transport.call(msg, {"adapter": "p"})
    out = []
    for msg in inputs:
        t0 = time.perf_counter()
        tier.transport.call(msg, {"adapter": "p"})
        out.append(time.perf_counter() - t0)
    return out


def modelled_s(tier: Tier, flops: float, bytes_up: int, bytes_down: int) -> float:
    link = LinkShaper(tier.link.rtt_s, tier.link.rate_bps) if tier.link else None
    return flops / tier.flops_per_s + (link.one_way_s(bytes_up) + link.one_way_s(bytes_down) if link else 0.0)


def speeds_of(topo: Any, cfg: Any) -> tuple[list[float], float]:
    """The speeds and carrier to hold the latency against: the topology's, else the run's (a channel
    run's speed range ends and carrier; a beam run's DeepMIMO scenario carrier, and 30 km/h)."""
    beam = cfg.task == "beam_prediction"
    speeds = [float(v) for v in topo.extra.get("speed_kmh") or []] or \
        ([] if beam else sorted({float(v) for v in cfg.channels.speed_kmh if v > 0})) or [30.0]
    if "carrier_ghz" in topo.extra:
        return speeds, float(topo.extra["carrier_ghz"])
    if beam:
        from edgelam.channels.beam_data import scenario

        return speeds, scenario(cfg.beams.base_stations[0]).carrier_hz / 1e9
    return speeds, float(cfg.channels.carrier_ghz)


def start_tiers(topo: Any, adapter: Path, host: ModuleHost, services: list[Service]) -> list[Tier]:
    flops = float(topo.extra.get("device_flops_per_s", 2e10))
    tiers = [Tier("device", LocalTransport(host, "device"), None, flops)]
    for node in topo.nodes:
        services.append(start_service(host.model_name, "full", node.name, extra=["--adapter", f"p={adapter}"]))
    wait_ready(services)
    for node, svc in zip(topo.nodes, services):
        link = _link(topo.links, node.name)
        shaper = LinkShaper(link.rtt_s, link.rate_bps) if link and topo.emulate_links else None
        tiers.append(Tier(node.name, HttpTransport(svc.url, node.name, shaper), link, node.flops_per_s))
    return tiers


def predict_flops(host: ModuleHost, msg: dict[str, Any]) -> float:
    from edgelam.models.flops import flop_model, forward_flops

    n = host.task.tokens(msg)
    return forward_flops(flop_model(host.served.model), n, n)


def measure(topo: Any, services: list[Service]) -> dict[str, Any]:
    """Latency per placement (measured and modelled) against the coherence time at each speed."""
    from edgelam.config_load import load_config

    run = Path(topo.extra["run"])
    cfg = load_config(run / "config.yaml")
    host = ModuleHost(None, ModuleSpec("full"), {"p": str(run / "adapter")})
    inputs = held_out_inputs(cfg, host, int(topo.extra.get("requests", 20)))
    tiers = start_tiers(topo, run / "adapter", host, services)
    speeds, carrier = speeds_of(topo, cfg)
    flops = predict_flops(host, inputs[0])
    rows = []
    for tier in tiers:
        lat = time_tier(tier, inputs)
        stats = tier.transport.stats
        up, down = stats.bytes_up // max(stats.calls, 1), stats.bytes_down // max(stats.calls, 1)
        p95 = sorted(lat)[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
        rows.append({"placement": tier.name, "p50_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * p95,
                     "modelled_ms": 1e3 * modelled_s(tier, flops, up, down), "bytes_up": up, "bytes_down": down,
                     "rtt_ms": 1e3 * tier.link.rtt_s if tier.link else 0.0})
    coherence = {v: 1e3 * coherence_time_s(v, carrier) for v in speeds}
    for r in rows:
        r["meets"] = {v: r["p95_ms"] <= tc for v, tc in coherence.items()}
        r["modelled_meets"] = {v: r["modelled_ms"] <= tc for v, tc in coherence.items()}
    return {"task": host.task.name, "model": host.model_name, "carrier_ghz": carrier, "flops": flops,
            "requests": len(inputs), "coherence_ms": coherence, "placements": rows}


def run_predict(topo: Any) -> dict[str, Any]:
    """``measure`` with the services started and always stopped (SIGTERM included)."""
    from edgelam.infer.launch import sigterm_exits, stop_services

    services: list[Service] = []
    with sigterm_exits():
        try:
            return measure(topo, services)
        finally:
            stop_services(services)


def deadline_table(report: dict[str, Any]) -> Any:
    """The placements against the coherence time at each speed (rich Table): within T_c by the
    measured p95, and in brackets by the model where the two disagree."""
    from rich.table import Table

    speeds = list(report["coherence_ms"])
    t = Table(title=f"{report['task']} ({report['model']}): ms per prediction, {report['requests']} requests, "
                    f"{report['flops'] / 1e6:.1f} MFLOP each; within T_c at {report['carrier_ghz']:g} GHz?")
    for col in ("placement", "RTT", "p50", "p95", "model", *[f"{v:g} km/h\nT_c {report['coherence_ms'][v]:.2f}"
                                                             for v in speeds]):
        t.add_column(col, justify="right")
    for r in report["placements"]:
        cells = [("yes" if r["meets"][v] else "no") + ("" if r["meets"][v] == r["modelled_meets"][v]
                 else f" ({'yes' if r['modelled_meets'][v] else 'no'})") for v in speeds]
        t.add_row(r["placement"], f"{r['rtt_ms']:g}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                  f"{r['modelled_ms']:.2f}", *cells)
    return t
