"""Multi-access collaboration: one device, several edge servers each serving the whole model.

Each request goes to the better of two servers drawn at random (power of two choices, Mitzenmacher
2001; Ray Serve's default router), judged by load = (requests in flight + 1) x the moving average
of its measured per-call latency; an unmeasured server counts as idle. A server that leaves
mid-request is survived: the request's session moves to another server, which rebuilds the cache
from the replayed inputs (``client.Stage``), so the answer does not change. To spread one request's
pipeline over the servers instead, use a pipeline topology with replicas (``mode: pipeline``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from edgelam.infer.client import Stage, StageDown, Transport
from edgelam.infer.sampling import Sampling


@dataclass
class ServerLoad:
    in_flight: int = 0
    latency_s: float | None = None  # moving average per call
    requests: int = 0
    failures: int = 0


@dataclass
class MultiAccess:
    servers: list[Transport]
    seed: int = 0
    smoothing: float = 0.3
    loads: list[ServerLoad] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)  # the server that started each request
    failovers: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.servers) < 1:
            raise ValueError("multi-access needs at least one server")
        self.loads = [ServerLoad() for _ in self.servers]
        self.rng = np.random.default_rng(self.seed)
        self.lock = threading.Lock()

    def load(self, i: int) -> float:
        ld = self.loads[i]
        return (ld.in_flight + 1) * (ld.latency_s or 0.0)

    def pick(self, exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        alive = [i for i in range(len(self.servers)) if i not in exclude]
        if not alive:
            raise StageDown("no edge server left")
        if len(alive) == 1:
            return alive[0]
        a, b = self.rng.choice(alive, size=2, replace=False)
        return int(a) if (self.load(int(a)), int(a)) <= (self.load(int(b)), int(b)) else int(b)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None, adapter: str | None = None,
               sampling: Sampling | None = None) -> Iterator[int]:
        """Tokens of one request, greedy or ``sampling`` (drawn by the server with the random number of
        (seed, position): a replay on another server draws the same)."""
        import time

        with self.lock:
            first = self.pick()
        order = [first] + [i for i in range(len(self.servers)) if i != first]
        stage = Stage("full", [self.servers[i] for i in order])
        self.routes.append(first)
        session = uuid.uuid4().hex
        seq, pos = list(prompt_ids), 0
        try:
            for _ in range(max_new_tokens):
                server = order[stage.active]
                self.loads[server].in_flight += 1
                t = time.perf_counter()
                meta = {"session": session, "position": pos, "adapter": adapter}
                if sampling is not None:
                    meta["sampling"] = sampling.meta(len(seq))
                try:
                    out = stage.call({"input_ids": torch.tensor([seq[pos:]])}, meta, stateful=True)
                finally:
                    self.loads[server].in_flight -= 1
                now = order[stage.active]
                if now != server:  # it failed over during the call
                    self.loads[server].failures += 1
                else:
                    ld = self.loads[server]
                    dt = time.perf_counter() - t
                    ld.latency_s = dt if ld.latency_s is None else (1 - self.smoothing) * ld.latency_s + self.smoothing * dt
                self.loads[now].requests += 1
                pos = len(seq)
                tok = int(out["token_ids"][0, -1])
                seq.append(tok)
                yield tok
                if eos_id is not None and tok == eos_id:
                    return
        finally:
            self.failovers.extend(stage.failovers)
            stage.transport.close_session(session)
