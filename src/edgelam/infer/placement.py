"""Where the blocks go: contiguous block ranges on a chain of nodes, minimising per-token latency.

A decode step sends one hidden vector (hidden_size x bytes per value) through the stages. With
``relay="star"`` (EdgeLAM's coordinator: the device sends each stage its input and gets the output
back) every stage costs a round trip device <-> node; with ``relay="chain"`` (servers pushing to
the next server, the last answering the device) the hops are device -> node_1 -> ... -> node_m ->
device; with ``relay="push"`` (EdgeLAM's pushed chain, ``infer/push.py``: each server answers the one
that called it) every consecutive pair device, node_1, ..., node_m costs a round trip. The latency is
    sum_i n_i * F_block / F_i                      (compute of n_i blocks on node i)
  + sum_hops (RTT/2 + bytes / rate + overhead)
subject to n_i * M_block <= memory_i. ``plan`` finds the best ordered set of nodes and ranges by
dynamic programming over (blocks placed, last node, nodes used); ``brute_force`` enumerates every
ordered subset and every split, for checking on small cases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

DEVICE = "device"


@dataclass(frozen=True)
class Node:
    name: str
    memory_bytes: float
    flops_per_s: float


@dataclass(frozen=True)
class Link:
    rtt_s: float
    rate_bps: float


@dataclass(frozen=True)
class Problem:
    nodes: list[Node]
    links: dict[tuple[str, str], Link]  # (a, b) either way; DEVICE is the coordinator
    num_blocks: int
    block_flops: float  # per token, one block (2 x its parameters)
    block_bytes: float  # memory of one block (weights + KV budget)
    hop_bytes: float  # hidden_size x bytes per value
    hop_overhead_s: float = 0.0  # per-hop software overhead (serialisation, HTTP)
    relay: str = "star"  # star: the device relays between stages; chain: node to node; push: nested round trips

    def link(self, a: str, b: str) -> Link:
        got = self.links.get((a, b)) or self.links.get((b, a))
        if got is None and not self.links:
            return Link(0.0, 1e12)  # no links given at all: loopback
        if got is None:
            raise ValueError(f"no link between {a} and {b}; give one in the topology's links")
        return got

    def hop_s(self, a: str, b: str) -> float:
        ln = self.link(a, b)
        return ln.rtt_s / 2 + 8 * self.hop_bytes / ln.rate_bps + self.hop_overhead_s

    def enter_s(self, last: str, node: str) -> float:
        """Network time charged when ``node`` follows ``last`` in the chain (star: its round trip)."""
        if self.relay == "star":
            return self.hop_s(DEVICE, node) + self.hop_s(node, DEVICE)
        if self.relay == "push":
            return self.hop_s(last, node) + self.hop_s(node, last)
        return self.hop_s(last, node)

    def exit_s(self, last: str) -> float:
        return 0.0 if self.relay in ("star", "push") else self.hop_s(last, DEVICE)

    def compute_s(self, node: Node, n: int) -> float:
        return n * self.block_flops / node.flops_per_s

    def fits(self, node: Node, n: int) -> bool:
        return n * self.block_bytes <= node.memory_bytes


@dataclass(frozen=True)
class Plan:
    ranges: list[tuple[str, int, int]]  # (node, start, end): blocks start..end-1
    latency_s: float
    compute_s: float
    network_s: float

    def table(self) -> str:
        rows = [f"  {name:12s} blocks {a:>3d}..{b - 1:<3d} ({b - a} blocks)" for name, a, b in self.ranges]
        return "\n".join(["placement (per-token latency "
                          f"{self.latency_s * 1e3:.2f} ms = compute {self.compute_s * 1e3:.2f} + network {self.network_s * 1e3:.2f})",
                          *rows])


def evaluate(p: Problem, ranges: list[tuple[str, int, int]]) -> Plan:
    nodes = {n.name: n for n in p.nodes}
    compute = sum(p.compute_s(nodes[name], b - a) for name, a, b in ranges)
    chain = [DEVICE, *[name for name, _, _ in ranges]]
    network = sum(p.enter_s(x, y) for x, y in zip(chain, chain[1:])) + p.exit_s(chain[-1])
    return Plan(list(ranges), compute + network, compute, network)


def plan(p: Problem) -> Plan:
    """The optimal chain by DP over (next block, last node, used set); raises if nothing fits."""
    n_nodes, L = len(p.nodes), p.num_blocks
    names = [n.name for n in p.nodes]
    # best[(b, last, mask)] = (latency so far, back-pointer)
    best: dict[tuple[int, int, int], tuple[float, tuple[int, int, int] | None, int]] = {(0, -1, 0): (0.0, None, 0)}
    for b in range(L):
        for (bb, last, mask), (cost, _, _) in sorted((k, v) for k, v in best.items() if k[0] == b):
            here = DEVICE if last < 0 else names[last]
            for k in range(n_nodes):
                if mask & (1 << k):
                    continue
                hop = p.enter_s(here, names[k])
                for n in range(1, L - b + 1):
                    if not p.fits(p.nodes[k], n):
                        break
                    key = (b + n, k, mask | (1 << k))
                    c = cost + hop + p.compute_s(p.nodes[k], n)
                    if key not in best or c < best[key][0] - 1e-15:
                        best[key] = (c, (bb, last, mask), n)
    finals = [(v[0] + p.exit_s(names[k[1]]), k) for k, v in best.items() if k[0] == L and k[1] >= 0]
    if not finals:
        raise ValueError(f"the {L} blocks ({L * p.block_bytes / 1e9:.2f} GB) do not fit on the nodes' memory")
    _, key = min(finals)
    ranges: list[tuple[str, int, int]] = []
    cur: tuple[int, int, int] | None = key
    while cur is not None and cur[1] >= 0:
        _, prev, n = best[cur]
        ranges.append((names[cur[1]], cur[0] - n, cur[0]))
        cur = prev
    return evaluate(p, ranges[::-1])


def brute_force(p: Problem) -> Plan:
    """Every ordered subset of nodes and every split of the blocks among them (small cases only)."""
    best: Plan | None = None
    L = p.num_blocks
    for m in range(1, len(p.nodes) + 1):
        for order in itertools.permutations(p.nodes, m):
            for cuts in itertools.combinations(range(1, L), m - 1):
                bounds = [0, *cuts, L]
                ranges = [(node.name, a, b) for node, a, b in zip(order, bounds, bounds[1:])]
                if not all(p.fits(node, b - a) for node, (_, a, b) in zip(order, ranges)):
                    continue
                cand = evaluate(p, ranges)
                if best is None or cand.latency_s < best.latency_s - 1e-15:
                    best = cand
    if best is None:
        raise ValueError("nothing fits")
    return best


def problem_for_model(config: object, nodes: list[Node], links: dict[tuple[str, str], Link], bytes_per_value: int = 4,
                      hop_overhead_s: float = 0.0, kv_tokens: int = 2048, relay: str = "star") -> Problem:
    """Block FLOPs and memory from a Llama-style config (attention + gated MLP), KV for ``kv_tokens``."""
    d = int(getattr(config, "hidden_size"))
    inter = int(getattr(config, "intermediate_size"))
    heads = int(getattr(config, "num_attention_heads"))
    kv_heads = int(getattr(config, "num_key_value_heads", heads))
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    params = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * inter
    kv = 2 * kv_heads * head_dim * kv_tokens * bytes_per_value
    return Problem(nodes, links, int(getattr(config, "num_hidden_layers")), 2.0 * params,
                   params * bytes_per_value + kv, d * bytes_per_value, hop_overhead_s, relay)
