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
    keys: keys.json              # optional keyring (`edgelam keys`, nodes device + every edge node): each service
                                 # takes only requests signed by the device and signs its answers (security/mac.py)

``open_topology`` starts the ``edgelam serve`` processes the mode needs (one per block range and
replica for a pipeline; see ``infer/launch.py``), waits until each answers /ready, builds the
device's coordinator (one ``Runner`` builder per mode, in ``RUNNERS``) and stops them all on exit.
``load_topology`` checks the whole file first: a bad value is one ConfigError naming the key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgelam.config import ConfigError
from edgelam.config_checks import number as _number
from edgelam.infer.client import (
    HttpTransport,
    LinkShaper,
    LocalTransport,
    Stage,
    Transport,
)
from edgelam.infer.deadline import PREDICT_KEYS, check_predict
from edgelam.infer.launch import (
    Service,
    free_port,
    sigterm_exits,
    start_service,
    stop_services,
    wait_ready,
)
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.threads import Budget, budget_of
from edgelam.infer.multi_access import MultiAccess
from edgelam.infer.pipeline import Generation, Pipeline
from edgelam.infer.placement import Link, Node, Plan, evaluate, plan, problem_for_model
from edgelam.infer.push import PushChain, check_push, hop_between, pushes, relay_model
from edgelam.infer.sampling import Sampling
from edgelam.infer.speculative import (
    AdaptiveGamma,
    Escalation,
    EscalationStats,
    SpecStats,
    Speculative,
)
from edgelam.models.split import is_encoder
from edgelam.security.keys import load_keyring
from edgelam.security.mac import Signer

__all__ = ["RUNNERS", "Runner", "Service", "Topology", "device_draft", "free_port", "load_topology", "open_topology",
           "start_service", "stop_services", "wait_ready"]
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
    keys: str | None = None  # a keyring: authenticated links (None: plain HTTP as before)
    budgets: dict[str, Budget] = field(default_factory=dict)  # node -> its services' threads / cpus


ALLOWED = {"name", "model", "mode", "nodes", "links", "placement", "replicas", "max_new_tokens", "wire_dtype",
           "emulate_links", "hop_overhead_ms", "keys"}
DEVICE = "device"  # the coordinator's node name in a keyring
MODE_KEYS = {"pipeline": {"push"}, "speculative": {"target", "draft", "draft_model", "draft_adapter", "gamma", "gamma_max"},
             "escalation": {"tiers"}, "multi_access": {"servers", "seed"}, "predict": PREDICT_KEYS}


def parse_nodes(data: dict[str, Any], where: str) -> list[Node]:
    raw = data.get("nodes")
    if not isinstance(raw, list) or not raw or not all(isinstance(n, dict) and "name" in n for n in raw):
        raise ConfigError(f"{where}: nodes must be a non-empty list of {{name, flops_per_s, memory_gb (optional)}}")
    return [Node(str(n["name"]), _number(n, "memory_gb", 1e9, 0, f"{where}, node {n['name']}", strict=True) * 1e9,
                 _number(n, "flops_per_s", None, 0, f"{where}, node {n['name']}", strict=True)) for n in raw]


def parse_links(data: dict[str, Any], where: str) -> dict[tuple[str, str], Link]:
    raw = data.get("links", [])
    if not isinstance(raw, list) or not all(isinstance(ln, dict) and "a" in ln and "b" in ln for ln in raw):
        raise ConfigError(f"{where}: links must be a list of {{a, b, rtt_ms, rate_mbps or distance_m}}")
    return {(str(ln["a"]), str(ln["b"])): parse_link(ln, f"{where}, link {ln['a']}-{ln['b']}") for ln in raw}


def parse_placement(data: dict[str, Any], where: str) -> dict[str, tuple[int, int]] | None:
    raw = data.get("placement", "auto")
    if raw == "auto":
        return None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
                                            for v in raw.values()):
        raise ConfigError(f"{where}: placement must be 'auto' or a mapping node -> [start, end]")
    return {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}


def _check_speculative(extra: dict[str, Any], names: set[str], where: str) -> None:
    if not isinstance(extra.get("target"), dict) or str(extra["target"].get("node")) not in names:
        raise ConfigError(f"{where}: speculative mode needs target: {{node: NAME}} naming one of {sorted(names)}")
    try:
        ModuleSpec.parse(str(extra.get("draft", "full")))
    except ValueError as exc:
        raise ConfigError(f"{where}: draft: {exc}") from None
    if extra.get("gamma", "adaptive") != "adaptive":
        _number(extra, "gamma", 0, 0, where, integer=True)
    _number(extra, "gamma_max", 8, 1, where, integer=True)
    if extra.get("draft_adapter") is not None:
        _check_draft_adapter(extra["draft_adapter"], ModuleSpec.parse(str(extra.get("draft", "full"))), where)


def _check_draft_adapter(folder: Any, spec: ModuleSpec, where: str) -> None:
    """A PEFT folder; a trained draft's (task draft_distill) exit layer must be the draft's K."""
    from edgelam.tasks.serving import read_card

    if not isinstance(folder, str) or not folder:
        raise ConfigError(f"{where}: draft_adapter must be the path of a PEFT adapter folder (a draft_distill run's adapter/)")
    try:
        card = read_card(Path(folder))
    except ValueError as exc:
        raise ConfigError(f"{where}: draft_adapter: {exc}") from None
    if card is not None and card["task"] == "draft_distill" and (spec.kind, spec.end) != ("full", card["exit_layer"]):
        raise ConfigError(f"{where}: draft_adapter {folder} is a draft trained to exit after block {card['exit_layer']}: "
                          f"set draft: \"full:{card['exit_layer']}\" (got draft: {spec})")


def _check_escalation(extra: dict[str, Any], names: set[str], where: str) -> None:
    tiers = extra.get("tiers")
    if (not isinstance(tiers, list) or len(tiers) < 2
            or any(not isinstance(t, dict) or t.get("node") not in names for t in tiers)):
        raise ConfigError(f"{where}: escalation needs tiers: a list of >= 2 {{node, module, threshold}} "
                          f"with nodes among {sorted(names)}")
    for t in tiers:
        try:
            ModuleSpec.parse(str(t.get("module", "full")))
        except ValueError as exc:
            raise ConfigError(f"{where}: tier {t['node']}: {exc}") from None
    for t in tiers[:-1]:
        _number(t, "threshold", None, 0, f"{where}, tier {t['node']}")


def _check_multi_access(extra: dict[str, Any], names: set[str], where: str) -> None:
    servers = extra.get("servers")
    if not isinstance(servers, list) or not servers or any(s not in names for s in servers):
        raise ConfigError(f"{where}: multi_access needs servers: a list of node names among {sorted(names)}")
    _number(extra, "seed", 0, 0, where, integer=True)


MODE_CHECKS: dict[str, Callable[[dict[str, Any], set[str], str], None]] = {
    "pipeline": check_push, "speculative": _check_speculative,
    "escalation": _check_escalation, "multi_access": _check_multi_access, "predict": check_predict}


def _read_mapping(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"topology file '{p}' not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ConfigError(f"topology {p} is not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"topology {p} must be a YAML mapping (name:, model:, mode:, nodes:, ...), "
                          f"not a {type(data).__name__}")
    return data


def _check_model(model: str, where: str) -> None:
    if is_encoder(model):  # no causal LM head to generate with
        raise ConfigError(f"{where}: model '{model}' is an encoder (split learning); inference topologies need a causal "
                          f"LM: tiny, tiny-varied, smollm2, a Hugging Face id or a .gguf file")


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and check a topology file; every error is a ConfigError naming the key (before anything starts)."""
    p = Path(path)
    data = _read_mapping(p)
    where = f"topology {p}"
    mode = data.get("mode", "pipeline")
    if mode not in MODE_KEYS:
        raise ConfigError(f"{where}: mode '{mode}' must be one of {sorted(MODE_KEYS)}")
    unknown = sorted(set(data) - ALLOWED - MODE_KEYS[mode])
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in {where} (mode {mode}); allowed: {sorted(ALLOWED | MODE_KEYS[mode])}")
    model = str(data.get("model", "tiny-varied"))
    _check_model(model, where)
    nodes, links, placement = parse_nodes(data, where), parse_links(data, where), parse_placement(data, where)
    if data.get("wire_dtype", "float32") not in ("float32", "float16"):
        raise ConfigError(f"{where}: wire_dtype must be float32 or float16")
    if not isinstance(data.get("emulate_links", True), bool):
        raise ConfigError(f"{where}: emulate_links must be true or false")
    extra = {k: data[k] for k in MODE_KEYS[mode] if k in data}
    MODE_CHECKS[mode](extra, {n.name for n in nodes} | {"device"}, where)
    return Topology(str(data.get("name", p.stem)), model, mode, nodes, links, placement,
                    _number(data, "replicas", 1, 1, where, integer=True),
                    _number(data, "max_new_tokens", 16, 1, where, integer=True), str(data.get("wire_dtype", "float32")),
                    bool(data.get("emulate_links", True)), _number(data, "hop_overhead_ms", 0.0, 0, where), extra,
                    _check_keys(data, mode, [n.name for n in nodes], where), _budgets(data, where))


def _budgets(data: dict[str, Any], where: str) -> dict[str, Budget]:
    try:
        return {str(n["name"]): budget_of(n, f"{where}, node {n['name']}") for n in data["nodes"]}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_keys(data: dict[str, Any], mode: str, nodes: list[str], where: str) -> str | None:
    """The keyring's path, once it is readable, private and holds the device and every node."""
    if data.get("keys") is None:
        return None
    if not isinstance(data["keys"], str) or mode == "predict":
        raise ConfigError(f"{where}: keys must be the path of a keyring (edgelam keys), in a generating mode "
                          f"(not predict)")
    load_keyring(data["keys"]).require([DEVICE, *nodes], f"{where}: the device and every node need a key")
    return str(data["keys"])


def radio_rate_bps(distance_m: float, bandwidth_hz: float = 10e6, tx_power_dbm: float = 23.0,
                   noise_figure_db: float = 7.0) -> float:
    """The uplink rate of the net/ link model at ``distance_m`` without fading: macro path loss
    128.1 + 37.6 log10(d/km), -174 dBm/Hz noise + noise figure, Shannon rate B log2(1 + SNR)."""
    from edgelam.net import channel

    gain = channel.db_to_linear(-channel.path_loss_macro_db(max(distance_m, 1.0)))
    snr = channel.snr_linear(channel.dbm_to_w(tx_power_dbm), gain, channel.noise_power_w(bandwidth_hz, -174.0, noise_figure_db))
    return channel.shannon_rate_bps(bandwidth_hz, snr)


def parse_link(ln: dict[str, Any], where: str = "link") -> Link:
    """``rate_mbps`` as given, or from the radio model: ``distance_m`` (+ ``bandwidth_mhz``, ``tx_power_dbm``)."""
    rtt = _number(ln, "rtt_ms", None, 0, where) / 1e3
    if "rate_mbps" in ln:
        return Link(rtt, _number(ln, "rate_mbps", 0, 0, where, strict=True) * 1e6)
    if "distance_m" not in ln:
        raise ConfigError(f"{where}: give rate_mbps, or distance_m (+ bandwidth_mhz, tx_power_dbm) for the radio model")
    return Link(rtt, radio_rate_bps(_number(ln, "distance_m", 0, 0, where, strict=True),
                                    _number(ln, "bandwidth_mhz", 10.0, 0, where, strict=True) * 1e6,
                                    _number(ln, "tx_power_dbm", 23.0, -1e9, where)))


def make_plan(topo: Topology, model_config: Any) -> Plan:
    bpv = 2 if topo.wire_dtype == "float16" else 4
    prob = problem_for_model(model_config, topo.nodes, topo.links, bytes_per_value=bpv, hop_overhead_s=topo.hop_overhead_ms / 1e3,
                             relay=relay_model(topo))
    if topo.placement is None:
        return plan(prob)
    ranges = sorted(((n, a, b) for n, (a, b) in topo.placement.items()), key=lambda r: r[1])
    names = {n.name for n in topo.nodes}
    bounds = [0] + [b for _, _, b in ranges]
    if any(n not in names for n, _, _ in ranges) or [a for _, a, _ in ranges] != bounds[:-1] or bounds[-1] != prob.num_blocks:
        raise ConfigError(f"placement {topo.placement} must name known nodes and cover blocks 0..{prob.num_blocks - 1} "
                          f"in contiguous ranges")
    return evaluate(prob, ranges)


def build_pipeline(topo: Topology, pl: Plan, services: list[Service], adapter: str | None = None) -> Pipeline:
    """The device's coordinator: embed and head in process, one stage per block range whose
    candidates are that range's services (the first is used, the others are failover targets)."""
    embed = Stage("embed (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("embed")), "device")])
    head = Stage("head (device)", [LocalTransport(ModuleHost(topo.model, ModuleSpec("head")), "device")])
    stages = []
    for node, a, b in pl.ranges:
        cands = [remote(topo, s, f"{s.node}#{i}")
                 for i, s in enumerate(svc for svc in services if svc.module == f"blocks:{a}:{b}")]
        stages.append(Stage(f"blocks {a}..{b - 1} ({node})", cands))
    chain = PushChain(stages, hop_between(topo, services)) if pushes(topo, pl) else None
    return Pipeline(embed, stages, head, adapter, chain)


def link_to(topo: Topology, node: str) -> LinkShaper | None:
    if not topo.emulate_links or node == "device":
        return None
    ln = topo.links.get(("device", node)) or topo.links.get((node, "device"))
    return LinkShaper(ln.rtt_s, ln.rate_bps) if ln is not None else None


def remote(topo: Topology, svc: Service, name: str | None = None) -> HttpTransport:
    """The device's transport to ``svc``; with keys it signs as the device and expects answers from ``svc.node``."""
    signer = Signer(load_keyring(topo.keys), DEVICE) if topo.keys else None
    return HttpTransport(svc.url, name or svc.node, link_to(topo, svc.node), wire_dtype=topo.wire_dtype,
                         signer=signer, peer=svc.node if signer else None)


@dataclass
class Runner:
    """A launched topology: ``stream(ids, max_new, eos, sampling=None)`` yields tokens (greedy, or sampled as
    ``sampling.Sampling`` says); ``report()`` says what happened."""

    stream: Callable[..., Iterator[int]]
    report: Callable[[], dict[str, Any]]
    services: list[Service]
    plan: Plan | None = None

    def dead(self) -> list[str]:
        """The modules none of whose services is still running (empty while every module can answer)."""
        alive = {s.module for s in self.services if s.proc.poll() is None}
        return sorted({s.module for s in self.services} - alive)


# --- one Runner builder per mode: start the services into ``services``, build the coordinator ---

def start(topo: Topology, module: str, node: str, services: list[Service],
          push_to: Sequence[Service] = ()) -> Service:
    """Start ``module`` on ``node`` with the node's thread budget, allowed to push to ``push_to``."""
    keys = ["--keys", topo.keys, "--node", node] if topo.keys else []
    extra = [*keys, *topo.budgets.get(node, Budget()).args(), *(f"--push-to={s.url}" for s in push_to)]
    svc = start_service(topo.model, module, node, topo.wire_dtype, extra=extra)
    services.append(svc)  # appended at once: stopped on exit even if a later start fails
    return svc


def pipeline_runner(topo: Topology, model_config: Any, adapter: str | None, services: list[Service]) -> Runner:
    pl = make_plan(topo, model_config)
    names = [n.name for n in topo.nodes]
    push, after = pushes(topo, pl), list[Service]()
    for node, a, b in reversed(pl.ranges):  # the last range first: each range may push to the next one's services
        here = [start(topo, f"blocks:{a}:{b}", names[(names.index(node) + i) % len(names)], services,
                      after if push else [])
                for i in range(topo.replicas)]  # replica i on the i-th next node: a spare survives its primary's node
        after = here
    services.sort(key=lambda s: int(s.module.split(":")[1]))  # plan order again (stable: replicas keep theirs)
    wait_ready(services)
    pipe = build_pipeline(topo, pl, services, adapter)
    last: dict[str, Any] = {}
    failovers: list[dict[str, Any]] = []  # every generation's, in the order they ended

    def stream(ids: list[int], n: int, eos: int | None, sampling: Sampling | None = None) -> Iterator[int]:
        gen, own = Generation(len(ids)), pipe.fork()  # concurrent generations: each its own stage state
        last["gen"], last["pipe"] = gen, own
        try:
            yield from own.stream(ids, n, eos, gen, sampling)
        finally:
            failovers.extend(gen.failovers)
            for st, mine in zip(pipe.stages(), own.stages()):  # services found dead stay dead for later generations
                st.dead = st.dead | mine.dead
                if st.active in st.dead and mine.active not in st.dead:
                    st.active = mine.active

    def report() -> dict[str, Any]:
        gen, own = last.get("gen"), last.get("pipe")
        return {"stages": [t.stages for t in gen.timings] if gen else [], "failovers": list(failovers),
                "push_hops": own.chain.hops if own is not None and own.chain else []}

    return Runner(stream, report, services, pl)


class PinnedAdapter:
    """A transport whose every call runs ``adapter``, whatever adapter the caller names: the device's
    trained draft, while the topology's ``adapter`` goes to the target."""

    def __init__(self, inner: Transport, adapter: str) -> None:
        self.inner, self.adapter = inner, adapter
        self.name, self.stats = inner.name, inner.stats

    def call(self, tensors: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.inner.call(tensors, {**meta, "adapter": self.adapter})

    def close_session(self, session: str) -> None:
        self.inner.close_session(session)


DRAFT_ADAPTER = "draft"  # the name the device's draft host loads ``draft_adapter`` under


def device_draft(model: str, spec: str, adapter: str | None = None) -> Transport:
    """The device's draft in process: module ``spec`` of ``model``, with the PEFT folder ``adapter``
    (a draft_distill run's; None: the untrained early exit) used on every call."""
    if adapter is None:
        return LocalTransport(ModuleHost(model, ModuleSpec.parse(spec)), "device")
    try:
        host = ModuleHost(model, ModuleSpec.parse(spec), {DRAFT_ADAPTER: adapter})
    except ValueError as exc:
        raise ConfigError(f"draft_adapter {adapter}: {exc}") from None
    return PinnedAdapter(LocalTransport(host, "device"), DRAFT_ADAPTER)


def speculative_runner(topo: Topology, model_config: Any, adapter: str | None, services: list[Service]) -> Runner:
    node = topo.extra["target"]["node"]
    target = [start(topo, "full", node, services) for _ in range(topo.replicas)][0]
    # the draft loads here while the target's service starts
    draft = device_draft(str(topo.extra.get("draft_model", topo.model)), str(topo.extra.get("draft", "full")),
                         topo.extra.get("draft_adapter"))
    wait_ready(services)
    gamma = topo.extra.get("gamma", "adaptive")
    ctrl = AdaptiveGamma(gamma_max=int(topo.extra.get("gamma_max", 8)), fixed=None if gamma == "adaptive" else int(gamma))
    spec = Speculative(draft, remote(topo, target, node), ctrl, adapter)
    stats: dict[str, SpecStats] = {}

    def stream(ids: list[int], n: int, eos: int | None, sampling: Sampling | None = None) -> Iterator[int]:
        stats["last"] = SpecStats()
        yield from spec.stream(ids, n, eos, stats["last"], sampling)

    def report() -> dict[str, Any]:
        st = stats.get("last")
        return {} if st is None else {"rounds": st.rounds, "drafted": st.drafted, "accepted": st.accepted,
                                      "acceptance": st.acceptance, "gammas": st.gammas, "q_bytes": st.q_bytes}

    return Runner(stream, report, services)


def escalation_runner(topo: Topology, model_config: Any, adapter: str | None, services: list[Service]) -> Runner:
    placed: list[tuple[str, Service | LocalTransport]] = []
    for t in topo.extra["tiers"]:
        module = str(t.get("module", "full"))
        local = t["node"] == "device"
        placed.append((t["node"], LocalTransport(ModuleHost(topo.model, ModuleSpec.parse(module)), "device") if local
                       else start(topo, module, t["node"], services)))
    wait_ready(services)
    tiers: list[tuple[str, Transport]] = [(n, remote(topo, x, n) if isinstance(x, Service) else x) for n, x in placed]
    esc = Escalation(tiers, [float(t["threshold"]) for t in topo.extra["tiers"][:-1]], adapter)
    stats: dict[str, EscalationStats] = {}

    def stream(ids: list[int], n: int, eos: int | None, sampling: Sampling | None = None) -> Iterator[int]:
        stats["last"] = EscalationStats([name for name, _ in tiers], [0] * len(tiers))
        yield from esc.stream(ids, n, eos, stats["last"], sampling)

    def report() -> dict[str, Any]:
        st = stats.get("last")
        return {} if st is None else {"served": dict(zip(st.tiers, st.served)), "shares": st.shares()}

    return Runner(stream, report, services)


def multi_access_runner(topo: Topology, model_config: Any, adapter: str | None, services: list[Service]) -> Runner:
    for node in topo.extra["servers"]:
        start(topo, "full", node, services)
    wait_ready(services)
    ma = MultiAccess([remote(topo, s) for s in services], seed=int(topo.extra.get("seed", 0)))

    def stream(ids: list[int], n: int, eos: int | None, sampling: Sampling | None = None) -> Iterator[int]:
        yield from ma.stream(ids, n, eos, adapter, sampling)

    def report() -> dict[str, Any]:
        return {"routes": [services[i].node for i in ma.routes], "failovers": ma.failovers,
                "calls": {s.node: ld.requests for s, ld in zip(services, ma.loads)}}

    return Runner(stream, report, services)


RUNNERS: dict[str, Callable[[Topology, Any, str | None, list[Service]], Runner]] = {
    "pipeline": pipeline_runner, "speculative": speculative_runner, "escalation": escalation_runner,
    "multi_access": multi_access_runner}


@contextlib.contextmanager
def open_topology(topo: Topology, model_config: Any, adapter: str | None = None) -> Iterator[Runner]:
    """Start the services the topology's mode needs, build its coordinator, stop everything on exit
    (SIGTERM included: see ``launch.sigterm_exits``)."""
    services: list[Service] = []
    with sigterm_exits():
        try:
            yield RUNNERS[topo.mode](topo, model_config, adapter, services)
        finally:
            stop_services(services)
