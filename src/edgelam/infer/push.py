"""Server-to-server push: a block stage hands its hidden state straight to the next stage.

Relayed (the default without server links), every stage is a round trip between the device and
that stage's node: 2 x stages one-way trips over the radio per token. Pushed (Petals' rpc_push),
the device sends the token's hidden state to the first block service with the rest of the chain
in the request's metadata (``push``: one hop per later stage: its URL, node and the emulated link
from the previous stage); each service runs its blocks, sends its output to the next hop, and
answers with what came back, so one radio round trip plus the backhaul round trips between the
servers carries the whole chain (``Problem(relay="push")`` in ``placement.py`` prices it).

Safety: a service pushes only to the URLs it was started with (``edgelam serve --push-to URL``,
repeatable), so a request cannot make it call anything else (400 otherwise). With keys each
service signs its push as its own node and checks the next one's signed answer.

Failure: a dead next hop answers the device as a 502 (``StageDown``), a next hop that lost the
session as a 409 (``SessionLost``); the device then falls back to relaying for the rest of the
generation, replaying the generation's token chunks in their original order and sizes through
every stage (``Pipeline``), so each rebuilt KV cache is bit-identical and so is the answer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from edgelam.config import ConfigError
from edgelam.infer.client import HttpTransport, LinkShaper, SessionLost, Stage, StageDown
from edgelam.infer.modules import ModuleError, ModuleHost
from edgelam.security.mac import IntegrityError, Signer

MAX_HOPS = 32
MAX_EMULATED_RTT_S = 10.0


@dataclass(frozen=True)
class Hop:
    url: str
    node: str
    rtt_s: float = 0.0
    rate_bps: float | None = None

    def wire(self) -> dict[str, Any]:
        return {"url": self.url, "node": self.node, "rtt_s": self.rtt_s, "rate_bps": self.rate_bps}


def parse_hops(raw: Any) -> list[Hop]:
    """The ``push`` metadata of a request: a list of hops; ``ModuleError`` (400) naming what is wrong."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_HOPS:
        raise ModuleError(f"push must be a list of at most {MAX_HOPS} hops {{url, node, rtt_s, rate_bps}}")
    hops = []
    for i, h in enumerate(raw):
        if not isinstance(h, dict) or set(h) - {"url", "node", "rtt_s", "rate_bps"}:
            raise ModuleError(f"push hop {i} must be an object with url, node, rtt_s and rate_bps")
        url, node, rtt, rate = h.get("url"), h.get("node", ""), h.get("rtt_s", 0.0), h.get("rate_bps")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or not isinstance(node, str):
            raise ModuleError(f"push hop {i}: url must be an http(s) URL and node a string")
        if not _number(rtt) or not 0 <= rtt <= MAX_EMULATED_RTT_S:
            raise ModuleError(f"push hop {i}: rtt_s must be a number in [0, {MAX_EMULATED_RTT_S}]")
        if rate is not None and (not _number(rate) or not rate > 0):
            raise ModuleError(f"push hop {i}: rate_bps must be a number > 0, or null (unlimited)")
        hops.append(Hop(url.rstrip("/"), node, float(rtt), None if rate is None else float(rate)))
    return hops


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Forwarder:
    """A block service's side: run the module, then push its output to the next hop (if the request
    names one) and answer with what the rest of the chain returned."""

    host: ModuleHost
    allowed: frozenset[str]  # next-hop URLs this service may call (edgelam serve --push-to)
    signer: Signer | None = None  # with keys: sign pushes as this service's node
    wire_dtype: str = "float32"
    pool: dict[str, list[HttpTransport]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hops(self, meta: dict[str, Any]) -> list[Hop]:
        """The request's push hops, checked: ``ModuleError`` (400) if malformed or not allowed."""
        hops = parse_hops(meta.get("push"))
        if hops and hops[0].url not in self.allowed:
            raise ModuleError(f"push to {hops[0].url} refused: this service pushes only to "
                              f"{sorted(self.allowed) or 'no service'} (edgelam serve --push-to URL)")
        if hops and self.host.spec.kind != "blocks":
            raise ModuleError(f"push: only block modules push their hidden state (this is {self.host.spec})")
        return hops

    def push(self, hops: list[Hop], out: dict[str, Tensor], out_meta: dict[str, Any],
             meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Send the module's output ``out`` to the first of ``hops`` (the rest go along) and return what came
        back, with this hop measured in ``push_hops``; without hops, ``out`` itself."""
        if not hops:
            return out, out_meta
        nxt = hops[0]
        tr = self._take(nxt)
        calls, up, down, link = tr.stats.calls, tr.stats.bytes_up, tr.stats.bytes_down, tr.stats.link_seconds
        seconds = tr.stats.seconds
        try:
            back, back_meta = tr.call({"hidden": out["hidden"]}, {**meta, "push": [h.wire() for h in hops[1:]]})
        except StageDown as exc:
            raise ModuleError(f"push to {nxt.node} ({nxt.url}) failed: {exc}", 502) from None
        except SessionLost as exc:
            raise ModuleError(f"push to {nxt.node} ({nxt.url}): {exc}", 409) from None
        except IntegrityError as exc:  # the device relays instead and meets the problem itself
            raise ModuleError(f"push to {nxt.node} ({nxt.url}): {exc}", 502) from None
        except ModuleError as exc:  # a client error further down: the device's request is at fault
            raise ModuleError(str(exc), exc.status if 400 <= exc.status < 500 else 502) from None
        finally:
            self._give(nxt.url, tr)
        hop = {"to": nxt.node, "bytes_up": tr.stats.bytes_up - up, "bytes_down": tr.stats.bytes_down - down,
               "seconds": tr.stats.seconds - seconds, "link_seconds": tr.stats.link_seconds - link,
               "calls": tr.stats.calls - calls}
        return back, {**back_meta, "push_hops": [hop, *back_meta.get("push_hops", [])]}

    def _take(self, hop: Hop) -> HttpTransport:
        """A transport used by one request at a time (its stats then measure exactly this call)."""
        link = LinkShaper(hop.rtt_s, hop.rate_bps) if hop.rtt_s or hop.rate_bps else None
        with self.lock:
            free = self.pool.setdefault(hop.url, [])
            if free:
                tr = free.pop()
                tr.link = link
                return tr
        return HttpTransport(hop.url, hop.node or hop.url, link, wire_dtype=self.wire_dtype, signer=self.signer,
                             peer=(hop.node or None) if self.signer else None)

    def _give(self, url: str, tr: HttpTransport) -> None:
        with self.lock:
            self.pool.setdefault(url, []).append(tr)


@dataclass
class PushChain:
    """The device's side: the block stages called as one pushed chain. ``hop(prev, nxt)`` describes
    the hop from transport ``prev`` to transport ``nxt`` (URL, node, emulated link)."""

    stages: list[Stage]
    hop: Callable[[Any, Any], Hop]
    active: bool = True
    hops: list[dict[str, Any]] = field(default_factory=list)  # measured server-to-server hops

    def call(self, hidden: Tensor, meta: dict[str, Any]) -> Tensor:
        """The last stage's hidden state; ``StageDown`` / ``SessionLost`` mean: relay instead."""
        trs = [st.transport for st in self.stages]
        push = [self.hop(a, b).wire() for a, b in zip(trs, trs[1:])]
        out, out_meta = trs[0].call({"hidden": hidden}, {**meta, "push": push})
        self.hops.extend(out_meta.get("push_hops", []))
        return out["hidden"]


# --- topologies (``push: auto | true | false`` in a pipeline topology) ---

def check_push(extra: dict[str, Any], names: set[str], where: str) -> None:
    if extra.get("push", "auto") not in ("auto", True, False):
        raise ConfigError(f"{where}: push must be auto (push server to server where the topology links the "
                          f"stages' nodes), true or false (the device relays every stage), got {extra['push']!r}")


def _linked(topo: Any, a: str, b: str) -> bool:
    return (a, b) in topo.links or (b, a) in topo.links


def relay_model(topo: Any) -> str:
    """How the placement prices hops: ``push`` when the topology may push (true or auto) and links every pair
    of nodes (any pair may end up consecutive); else ``star`` (the device relays)."""
    mode = topo.extra.get("push", "auto") if topo.mode == "pipeline" else False
    names = [n.name for n in topo.nodes]
    every_pair = all(_linked(topo, a, b) for i, a in enumerate(names) for b in names[i + 1:])
    return "push" if mode in (True, "auto") and every_pair and len(names) > 1 else "star"


def pushes(topo: Any, plan: Any) -> bool:
    """Whether the pipeline of ``plan`` pushes: ``true`` needs a link between each two consecutive stages'
    nodes (ConfigError naming the missing one); ``auto`` pushes when they all have one."""
    mode = topo.extra.get("push", "auto")
    pairs = [(a[0], b[0]) for a, b in zip(plan.ranges, plan.ranges[1:])]
    missing = [(a, b) for a, b in pairs if not _linked(topo, a, b)]
    if mode is True and missing:
        raise ConfigError(f"topology {topo.name}: push: true needs a link between consecutive stages' nodes; add "
                          f"{{a: {missing[0][0]}, b: {missing[0][1]}, rtt_ms: ..., rate_mbps: ...}} to links, or set "
                          f"push: auto")
    return bool(pairs) and not missing and mode in (True, "auto")


def hop_between(topo: Any, services: list[Any]) -> Callable[[Any, Any], Hop]:
    """The hop from one stage's transport to the next: the next service's URL and node, and the emulated
    link between the two nodes (none when the topology does not emulate links)."""
    node_of = {s.url: s.node for s in services}

    def hop(a: Any, b: Any) -> Hop:
        na, nb = node_of[a.url], node_of[b.url]
        ln = topo.links.get((na, nb)) or topo.links.get((nb, na))
        if not topo.emulate_links or ln is None or na == nb:
            return Hop(b.url, nb)
        return Hop(b.url, nb, ln.rtt_s, ln.rate_bps)

    return hop
