"""Client work on a pool of Ray actors (``runtime.executor: ray``), on this machine or a cluster.

Each actor loads the run's Context once (``fl/context.setup``: base model and data, deterministic
from the config) and runs the works it is sent with this process's executor for the same config
(``runtime.executor: local``; clients batched when ``runtime.batch_clients`` > 1). A work is plain
data (``fl/executor.ClientWork``), so an actor on another node trains exactly what this process
would. The driver plans every trip's bytes and FLOPs from shapes before training
(``fl/executor.plan_trip``): the simulated clock, bytes and energy never depend on where training
ran, and the trained adapters only on the number of torch threads (rounding).
"""

from __future__ import annotations

import math
import os
import re
import socket
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from edgelam import progress
from edgelam.config import ConfigError, RunConfig
from edgelam.config_runtime import RuntimeConfig
from edgelam.fl.batched import local_executor
from edgelam.fl.context import setup
from edgelam.fl.executor import ClientResult, ClientWork

INSTALL = "pip install 'edgelam[scale]'"
PROBE_TIMEOUT_S = 5.0  # ray.init waits for minutes on an address where no cluster answers; a TCP connect does not


class ClientPool:
    """One actor: the run's Context, built once, and the local executor over it."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.threads is None:  # setup() sets cfg.threads when given
            torch.set_num_threads(max(1, int(cfg.runtime.ray_actor_cpus)))
        local = replace(cfg, runtime=replace(cfg.runtime, executor="local", ray_address=None))
        self.ctx = setup(local)
        self.executor = local_executor(self.ctx)  # one after another, or batched by runtime.batch_clients

    def node(self) -> tuple[str, str]:
        """(node id, node IP) of the node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]:
        return self.executor.run(works)


def chunks(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` contiguous pieces whose sizes differ by at most one
    (neighbouring clients stay together: they share an edge server, a cluster, a task)."""
    parts = min(parts, n)
    return [range(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"runtime.executor ray needs Ray, which is not installed ({exc}): {INSTALL}, "
                          f"or set runtime.executor: local") from exc
    return ray


def _probe(ray: Any, address: str) -> None:
    """Fail fast, naming the setting, when no Ray cluster answers at ``address`` ("auto", HOST:PORT or
    Ray Client's ray://HOST:PORT)."""
    where = f"runtime.ray_address {address!r}"
    try:
        if address == "auto":  # RAY_ADDRESS, else the last `ray start` on this machine
            address = ray._private.services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise ConfigError(f"{where}: no running Ray cluster found ({exc}). Start one with `ray start --head`, "
                          f"or set runtime.ray_address: null to start Ray on this machine") from exc
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where} must be auto or HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{where}: no Ray cluster answers there ({exc}). Start one with `ray start --head` "
                          f"on the head machine and pass its HOST:PORT, check the firewall, or set "
                          f"runtime.ray_address: null to start Ray on this machine") from exc


def connect(ray: Any, rt: RuntimeConfig) -> bool:
    """Join the Ray instance ``rt`` names (a running one in this process is reused); True when this
    call initialised Ray here, so the executor shuts it down again."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    opts: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
    if rt.ray_address is None:  # "local": a new instance here, even where `ray start` left one running
        need = math.ceil(rt.ray_actors * rt.ray_actor_cpus)
        opts |= {"address": "local", "num_cpus": max(os.cpu_count() or 1, need), "include_dashboard": False}
    else:
        _probe(ray, rt.ray_address)
        opts["address"] = rt.ray_address
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars
        try:
            ray.init(**opts)
        except (ConnectionError, RuntimeError) as exc:
            where = f"runtime.ray_address {rt.ray_address!r}: Ray did not connect" if rt.ray_address else \
                "runtime.executor ray: Ray did not start on this machine"
            raise ConfigError(f"{where} ({exc})") from exc
    return True


def died(actor: int, node: tuple[str, str] | None, clients: list[int], exc: Exception) -> str:
    """One line on a dead actor: which, where, running what, and Ray's reason (the actor's own
    exception's last line when its set-up failed: data or model missing on that node)."""
    text = str(exc)
    reason = ([ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__])[-1].rstrip(".")
    ip = re.search(r"\bip=([0-9A-Fa-f.:]+)", text)
    where = f"node {node[1]} ({node[0]})" if node else f"node {ip.group(1)}" if ip else "its node"
    if getattr(exc, "actor_init_failed", False):
        return (f"Ray actor {actor} could not set up the run on {where}: {reason}. "
                f"Each node needs edgelam installed and the run's data ($EDGELAM_DATA)")
    what = f"client{'s' if len(clients) > 1 else ''} {', '.join(map(str, clients))}" if clients else "no client yet"
    return (f"Ray actor {actor} on {where} died running {what}: {reason}. The run stops here rather than "
            f"retry elsewhere; resume it with `edgelam run --resume RUN_DIR` once the cluster is healthy")


class RayExecutor:
    """Works run on ``runtime.ray_actors`` Ray actors (``runtime.ray_actor_cpus`` CPUs each), in
    contiguous chunks, one per actor; results come back in the works' order."""

    def __init__(self, cfg: RunConfig) -> None:
        rt = cfg.runtime
        self.ray = _import_ray()
        self.started = connect(self.ray, rt)
        self.actors: list[Any] = []
        self.nodes: list[tuple[str, str]] = []  # (node id, IP) of each actor, once they have all started
        self.works_by_node: dict[str, int] = {}  # node id -> works run there (what a test checks)
        try:
            cpus = self.ray.cluster_resources().get("CPU", 0.0)
            if cpus < rt.ray_actors * rt.ray_actor_cpus:
                raise ConfigError(f"runtime.ray_actors {rt.ray_actors} x runtime.ray_actor_cpus {rt.ray_actor_cpus} "
                                  f"need more CPUs than the Ray cluster has ({cpus:g}); lower them or add nodes")
            remote = self.ray.remote(ClientPool).options(num_cpus=rt.ray_actor_cpus, scheduling_strategy="SPREAD")
            self.actors = [remote.remote(cfg) for _ in range(rt.ray_actors)]
            # the actors load the model while the driver does its own set-up; run() waits for them
            self._starting = [a.node.remote() for a in self.actors]
        except BaseException:
            self.close()
            raise

    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]:
        if not works:
            return []
        self._wait_started()
        progress.trips_started(len(works))
        pieces = chunks(len(works), len(self.actors))
        pending = {self.actors[i].run.remote([works[j] for j in piece]): i for i, piece in enumerate(pieces)}
        done: list[list[ClientResult]] = [[] for _ in pieces]
        while pending:  # chunks as they finish: progress, and a dead actor stops the run at once
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            clients = [works[j].client for j in pieces[i]]
            done[i] = self._get(ref, i, clients)
            node_id = self.nodes[i][0]
            self.works_by_node[node_id] = self.works_by_node.get(node_id, 0) + len(clients)
            for k in clients:
                progress.trip_done(k)
        return [r for chunk in done for r in chunk]

    def _wait_started(self) -> None:
        if not self.nodes:
            self.nodes = [self._get(ref, i, []) for i, ref in enumerate(self._starting)]

    def _get(self, ref: Any, actor: int, clients: list[int]) -> Any:
        """``ray.get``; an actor that died (its process or node lost) stops the run with what it was
        running and where: retrying elsewhere could silently change the run's results."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            node = self.nodes[actor] if actor < len(self.nodes) else None
            raise RuntimeError(died(actor, node, clients, exc)) from exc

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this executor started it."""
        if self.ray.is_initialized():
            for actor in self.actors:
                self.ray.kill(actor)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False
