"""EdgeLAM on Flower: the whole run inside a ServerApp, each client trip on a SuperNode.

The ServerApp runs ``lifecycle.run`` unchanged (driver, strategy, simulated network, run folder,
checkpoints, adapters) with a ``FlowerExecutor``: each ``ClientWork`` of a round goes as a "train"
``Message`` through the ``Grid`` to the SuperNode serving that client, and the replies come back
as ``ClientResult``s in the works' order. The ClientApp rebuilds the run's Context from the config
in the message (``fl.context.setup``: deterministic from the config) and runs the trip with
``LocalExecutor.run_one``, so a synchronous strategy's rounds are the simulator's rounds.

Client k is served by the SuperNode whose ``--node-config`` says ``partition-id = k mod
num-partitions``; the ServerApp learns each node's partition once, with a "query" message.
Per trip it measures the wall seconds from sending to the reply and the bytes of both messages
(``flower_trips.jsonl`` in the run folder); the rows' time, bytes and energy stay the simulated
wireless network's.

Asynchronous, hierarchical and split schemes are refused: they need the event clock, the edge
tier or the cut activations, which one Grid exchange per round does not give.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context as FlowerContext, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_project_dir
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

if TYPE_CHECKING:  # torch-heavy; imported where used, so a "query" ClientApp starts in a second
    from edgelam.config import RunConfig
    from edgelam.fl.context import Context
    from edgelam.fl.executor import ClientResult, ClientWork

TRIPS = "flower_trips.jsonl"  # in the run folder: one line per trip, measured
POLL_S = 0.25  # how often the ServerApp asks the SuperLink for replies (a SuperNode itself polls every 3 s)

server_app = ServerApp()
client_app = ClientApp()


def check_strategy(cfg: RunConfig) -> None:
    """Refuse what one Grid exchange per round cannot carry (a ``ConfigError`` naming the choices)."""
    from edgelam.config import ConfigError
    from edgelam.fl.strategies import STRATEGIES

    kind = STRATEGIES[cfg.fl.strategy].driver
    if kind != "sync":
        sync = sorted(n for n, s in STRATEGIES.items() if s.driver == "sync")
        what, needs = {"async": ("an asynchronous", "the event clock (updates arriving one by one)"),
                       "hier": ("a hierarchical", "the edge tier"),
                       "split": ("a split-learning", "the cut activations of every step")}[kind]
        raise ConfigError(f"fl.strategy {cfg.fl.strategy} is {what} scheme and needs {needs}, which a Flower round "
                          f"does not give; on Flower use a synchronous one: {', '.join(sync)}")


def message_bytes(msg: Message) -> int:
    """The bytes of a message as Flower ships it: its deflated objects (content, arrays, metadata),
    each once, before HTTP framing."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


# --- the ServerApp side ---


def exchange(grid: Grid, messages: Sequence[Message], timeout_s: float) -> list[tuple[Message, float]]:
    """Push ``messages`` at once, pull until each has its reply; (reply, seconds from push) in order."""
    t0 = time.perf_counter()
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages) or any(not i for i in ids):
        raise RuntimeError(f"the SuperLink accepted {sum(1 for i in ids if i)} of {len(messages)} messages "
                           f"(too large? its log says)")
    got: dict[str, tuple[Message, float]] = {}
    while len(got) < len(ids):
        if time.perf_counter() - t0 > timeout_s:
            missing = [m.metadata.dst_node_id for i, m in zip(ids, messages) if i not in got]
            raise TimeoutError(f"no reply after {timeout_s:.0f} s from SuperNode(s) {missing}; are they running?")
        for reply in grid.pull_messages([i for i in ids if i not in got]):  # a pulled reply is gone: ask once
            got[reply.metadata.reply_to_message_id] = (reply, time.perf_counter() - t0)
        time.sleep(POLL_S)
    return [got[i] for i in ids]


def partition_of(reply: Message, node: int) -> tuple[int, int]:
    """(partition-id, num-partitions) a SuperNode reported, checked."""
    if reply.has_error():
        raise RuntimeError(f"SuperNode {node} could not answer the query: {reply.error.reason}")
    rec = reply.content["node"] if reply.has_content() and "node" in reply.content else ConfigRecord()
    part, n = rec.get("partition-id", -1), rec.get("num-partitions", 0)
    if not (isinstance(part, int) and isinstance(n, int) and 0 <= part < n):
        raise RuntimeError(f"SuperNode {node} has no usable partition in its --node-config (partition-id={part!r}, "
                           f"num-partitions={n!r}); start it with --node-config 'partition-id=K num-partitions=N'")
    return part, n


def covered(known: dict[int, tuple[int, int]]) -> dict[int, int] | None:
    """partition -> node once the nodes agree on N and every partition 0..N-1 has its node."""
    if len({n for _, n in known.values()}) > 1:
        raise RuntimeError(f"the SuperNodes disagree on num-partitions: {sorted(set(known.values()))}")
    by_part: dict[int, int] = {}
    for node, (part, _) in sorted(known.items()):
        if part in by_part:
            raise RuntimeError(f"SuperNodes {by_part[part]} and {node} both say partition-id={part}")
        by_part[part] = node
    n = next(iter(known.values()))[1] if known else 0
    return by_part if n and len(by_part) == n else None


class NodeMap:
    """partition-id -> node id of the SuperNodes, each asked once for its --node-config ("query").
    ``ask`` only sends, so the ServerApp asks first and loads the model while the nodes answer."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.asked: dict[str, int] = {}  # query message id -> node
        self.known: dict[int, tuple[int, int]] = {}  # node -> (partition-id, num-partitions)

    def ask(self) -> None:
        new = [n for n in self.grid.get_node_ids() if n not in self.asked.values()]
        if new:
            ids = self.grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query") for n in new])
            self.asked |= {i: n for i, n in zip(ids, new) if i}

    def wait(self, timeout_s: float) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            self.ask()  # nodes that joined since
            pending = [i for i, n in self.asked.items() if n not in self.known]
            for reply in self.grid.pull_messages(pending) if pending else ():  # a pulled reply is gone: ask once
                node = self.asked[reply.metadata.reply_to_message_id]
                self.known[node] = partition_of(reply, node)
            found = covered(self.known)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                have = {node: p for node, (p, _) in self.known.items()}
                raise TimeoutError(f"after {timeout_s:.0f} s the SuperNodes cover partitions {sorted(have.values())} "
                                   f"(nodes {sorted(have)}, {len(self.asked)} asked); start one per partition-id "
                                   f"0..N-1 with flower-supernode --node-config 'partition-id=K num-partitions=N'")
            time.sleep(POLL_S)


class FlowerExecutor:
    """Runs a round's works on the SuperNodes (one message each, all in flight at once) and logs each
    trip's measured seconds and bytes to ``trips`` (JSON lines)."""

    def __init__(self, grid: Grid, config_json: str, trips: Path, node_timeout_s: float = 120.0,
                 reply_timeout_s: float = 3600.0, nodes: NodeMap | None = None) -> None:
        self.grid, self.config_json, self.trips = grid, config_json, trips
        self.node_timeout_s, self.reply_timeout_s = node_timeout_s, reply_timeout_s
        self.nodes = nodes or NodeMap(grid)
        self.partitions: dict[int, int] | None = None  # partition-id -> node id, learnt once

    def node_for(self, client: int) -> int:
        if self.partitions is None:
            self.partitions = self.nodes.wait(self.node_timeout_s)
            log(INFO, "EdgeLAM: SuperNodes by partition-id: %s", self.partitions)
        return self.partitions[client % len(self.partitions)]

    def run(self, works: Sequence[ClientWork]) -> list[ClientResult]:
        from edgelam.flower.records import records_result, work_records
        from edgelam.store import to_json_line

        nodes = [self.node_for(w.client) for w in works]
        down = [Message(work_records(w, self.config_json), dst_node_id=n, message_type="train", group_id=str(w.version))
                for w, n in zip(works, nodes)]
        sizes = [message_bytes(m) for m in down]
        replies = exchange(self.grid, down, self.reply_timeout_s)
        results, lines = [], []
        for w, node, size, (reply, seconds) in zip(works, nodes, sizes, replies):
            if reply.has_error():
                raise RuntimeError(f"client {w.client} on SuperNode {node}: the ClientApp failed: {reply.error.reason}")
            results.append(records_result(reply.content, w.client))
            lines.append(to_json_line({"round": w.version, "client": w.client, "node": node, "seconds": seconds,
                                       "bytes_down": size, "bytes_up": message_bytes(reply)}) + "\n")
        with open(self.trips, "a", encoding="utf-8") as fh:
            fh.writelines(lines)
        return results


def app_path(grid: Grid, path: str) -> Path:
    """A run-config path: absolute as given, else inside the installed app folder (where the FAB put it)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    run = grid.run
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash) / p


@server_app.main()
def main(grid: Grid, context: FlowerContext) -> None:
    """The run-config keys: ``config`` (the EdgeLAM YAML, in the app folder), ``run-dir`` (the run
    folder; relative to the SuperLink's working directory), ``resume``, ``node-timeout-s``,
    ``reply-timeout-s``."""
    nodes = NodeMap(grid)
    nodes.ask()  # the SuperNodes answer while the imports below and the model load run
    from edgelam.config import ConfigError
    from edgelam.config_load import config_to_dict, load_config
    from edgelam.data.build import resolve_auto
    from edgelam.lifecycle import run

    rc = context.run_config
    missing = [k for k in ("config", "run-dir") if not isinstance(rc.get(k), str)]
    if missing:
        raise ConfigError(f"the app's [tool.flwr.app.config] needs {' and '.join(missing)} (paths as strings); "
                          f"`edgelam flower app CONFIG --out DIR` writes a complete one")
    if not os.environ.get("EDGELAM_DEBUG"):  # as the CLI: library deprecation chatter is not for our users
        warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(app_path(grid, str(rc["config"])))
    cfg = dataclasses.replace(cfg, data=resolve_auto(cfg.data)[0])
    check_strategy(cfg)
    out = Path(str(rc["run-dir"])).expanduser().resolve()
    config_json = json.dumps(config_to_dict(cfg), sort_keys=True)

    def executor(ctx: Context) -> FlowerExecutor:
        return FlowerExecutor(grid, config_json, out / TRIPS, float(rc.get("node-timeout-s", 120)),
                              float(rc.get("reply-timeout-s", 3600)), nodes)

    def on_round(row: dict[str, Any]) -> None:
        log(INFO, "EdgeLAM round %s: train loss %s, eval loss %s, sim time %.2f s", row["round"], row["train_loss"],
            row["eval_loss"], row["sim_time_s"])

    log(INFO, "EdgeLAM: %s (%s) -> %s", cfg.name, cfg.fl.strategy, out)
    summary = run(cfg, out, resume=bool(rc.get("resume", False)), on_round=on_round, executor=executor)
    log(INFO, "EdgeLAM finished: %s", json.dumps(summary, default=str))


# --- the ClientApp side ---

_CONTEXTS: dict[str, Any] = {}  # config JSON -> Context; Flower starts a process per message in deployment
# (flwr-clientapp), so there each message rebuilds it; where one process serves many (Flower's
# simulation runtime) the model and data load once


def client_context(config_json: str) -> Context:
    """The run's Context for ``config_json``, built once per process (the latest config only)."""
    from edgelam.config_load import config_from_dict
    from edgelam.fl.context import setup

    if config_json not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[config_json] = setup(config_from_dict(json.loads(config_json)))
    ctx: Context = _CONTEXTS[config_json]
    return ctx


@client_app.train()
def train(msg: Message, context: FlowerContext) -> Message:
    from edgelam.fl.executor import LocalExecutor
    from edgelam.flower.records import records_work, result_records

    work, config_json = records_work(msg.content)
    result = LocalExecutor(client_context(config_json)).run_one(work)
    return Message(result_records(result), reply_to=msg)


@client_app.query()
def query(msg: Message, context: FlowerContext) -> Message:
    """This SuperNode's partition (``--node-config``): which clients it serves."""
    node = context.node_config
    part, n = node.get("partition-id", -1), node.get("num-partitions", 0)
    rec = ConfigRecord({"partition-id": int(part) if isinstance(part, int) else -1,
                        "num-partitions": int(n) if isinstance(n, int) else 0})
    return Message(RecordDict({"node": rec}), reply_to=msg)
