"""Federated unlearning: the adapter a finished run would have without client K's contribution.

retrain    the exact reference: the run's config again with K added to ``privacy.unlearn.exclude``;
           the selection draws are unchanged, so it is the same run minus K's trips.
rollback   exact and cheaper: continue the run from its checkpoint of the round before K first took
           part (``privacy.unlearn.checkpoints: every``), K excluded from there on; the rounds before
           never held K, so the result is bit-identical to ``retrain`` (tests/test_unlearn.py).
federaser  approximate: FedEraser (Liu et al., "FedEraser: Enabling Efficient Client-Level Data
           Removal from Federated Learning Models", IWQoS 2021). From the stored updates
           (``privacy.unlearn.store_updates``) the global model is rebuilt round by round: the other
           clients of each round train a short calibration (``calibration_ratio`` x the local steps)
           from the unlearned model, and the server keeps each stored update's size with the
           calibration's direction, U~_k = ||U_k|| U^_k / ||U^_k|| (per tensor, as the authors' code
           does per layer), aggregated as the run aggregates (FedAvg weights). The rounds before K's
           first are skipped: the stored start of that round is the model without K (exact), which
           FedEraser's replay from round 1 would only approximate.
cluster    SISA-like (Bourtoule et al., "Machine Unlearning", S&P 2021): in a run whose clusters are
           fixed by device resources (``rescluster``) only K's cluster is retrained, without K; the
           other clusters' adapters are kept bit for bit. IFCA and CFL are refused: their memberships
           depend on every client's updates, K's included.

Each method returns the unlearned server state, where its adapters were saved (PEFT format) and its
cost on the simulated network (time, radio bytes, device energy); ``unlearn`` runs the chosen
methods beside the reference and measures each (``assess``): loss on K's training data, the
loss-threshold membership-inference AUC on K (``privacy/mia.py``; 0.5 = no leakage) and utility
(loss on the other clients' held-out data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelam.config import RunConfig, TrainConfig
from edgelam.config_load import load_config
from edgelam.fl.driver import FLDriver
from edgelam.fl.evaluate import task_sums
from edgelam.fl.rounds import filled, start_jobs
from edgelam.fl.strategies import STRATEGIES, build_strategy
from edgelam.fl.strategies.base import GLOBAL, State, get_prefixed, replace_prefixed
from edgelam.lifecycle import fork, run
from edgelam.models.load import base_seed
from edgelam.models.lora import save_adapter, set_adapter_state
from edgelam.net.topology import draw_links
from edgelam.privacy.mia import loss_attack, mia_sets
from edgelam.rundir import CHECKPOINT, CONFIG, METRICS, RunFolderError, json_safe, load_checkpoint, load_updates, read_rows
from edgelam.rundir import round_file, updates_file
from edgelam.store import Purpose, atomic_write_json, rng_for, torch_seed_for
from edgelam.tasks.base import add_sums
from edgelam.tasks.serving import write_card

# schemes whose aggregation is the reduce (FedAvg weights) per adapter, with no server optimizer state
FEDERASER_STRATEGIES = ("fedavg", "fedprox", "rescluster")


class UnlearnError(RunFolderError):
    """A run cannot be unlearned as asked (a missing setting, a client that never took part)."""


@dataclass(frozen=True)
class UnlearnOptions:
    calibration_ratio: float = 0.5  # FedEraser: calibration steps / local steps (the paper's r = 0.5)
    reference: bool = True  # also retrain from scratch (the exact reference) when another method is asked

    def __post_init__(self) -> None:
        if not 0 < self.calibration_ratio <= 1:
            raise UnlearnError(f"--calibration-ratio must be in (0, 1] (calibration steps / local steps), got "
                               f"{self.calibration_ratio}")


@dataclass(frozen=True)
class Cost:
    """What unlearning spent on the simulated network."""

    sim_time_s: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    energy_j: float = 0.0

    def relative(self, ref: "Cost") -> dict[str, float | None]:
        """Each figure (and ``bytes``, up + down) as a fraction of ``ref``'s (full retraining)."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(ref)
        a["bytes"], b["bytes"] = self.bytes_up + self.bytes_down, ref.bytes_up + ref.bytes_down
        return {k: a[k] / b[k] if b[k] else None for k in a}


@dataclass(frozen=True)
class Source:
    """A finished run: its folder, config, metrics rows and final server state."""

    path: Path
    cfg: RunConfig
    rows: list[dict[str, Any]]
    state: State


@dataclass(frozen=True)
class Unlearned:
    method: str
    state: State  # the unlearned server state (adapters under their prefixes)
    adapters: dict[str, str]  # adapter name -> saved PEFT folder
    cost: Cost


# --- the source run ---


def open_run(path: Path) -> Source:
    """A finished federated run folder, or an error naming what is missing."""
    if not (path / CONFIG).is_file() or not (path / CHECKPOINT).is_file():
        raise UnlearnError(f"{path} is not a finished EdgeLAM run folder (no {CONFIG} or {CHECKPOINT}); give the folder "
                           f"`edgelam run --out` wrote")
    cfg = load_config(path / CONFIG)
    st, _ = load_checkpoint(path / CHECKPOINT)
    if st.round != cfg.fl.rounds:
        raise UnlearnError(f"{path} stopped at round {st.round} of {cfg.fl.rounds}; finish it first with "
                           f"`edgelam run --resume {path}`")
    if STRATEGIES[cfg.fl.strategy].driver == "split":
        raise UnlearnError(f"{path} is a split-learning run ({cfg.fl.strategy}); unlearning applies to federated schemes")
    return Source(path, cfg, [r for r in read_rows(path / METRICS)[0] if r["round"] <= st.round], st.state)


def rounds_with(rows: Sequence[dict[str, Any]], client: int, dropped: bool = False) -> list[int]:
    """The rounds whose update from ``client`` arrived (``dropped``: or whose trip it started)."""
    return [r["round"] for r in rows if client in r.get("clients", []) + (r.get("dropped", []) if dropped else [])]


def check_client(src: Source, client: int) -> None:
    n = src.cfg.data.num_clients
    if not 0 <= client < n:
        raise UnlearnError(f"--client {client} is out of range: {src.path} has clients 0..{n - 1}")
    if client in src.cfg.privacy.unlearn.exclude:
        raise UnlearnError(f"client {client} is already excluded from {src.path} (privacy.unlearn.exclude); nothing to unlearn")
    if not rounds_with(src.rows, client):
        raise UnlearnError(f"client {client} never took part in {src.path} (no round lists it in `clients`); nothing to "
                           f"unlearn")


def with_excluded(cfg: RunConfig, clients: Sequence[int]) -> RunConfig:
    """``cfg`` with ``clients`` added to ``privacy.unlearn.exclude`` (validated again)."""
    un = cfg.privacy.unlearn
    un = dataclasses.replace(un, exclude=tuple(sorted(set(un.exclude) | set(clients))))
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, unlearn=un))


def cost_between(rows: Sequence[dict[str, Any]], first: int, last: int) -> Cost:
    """The network cost of rounds ``first + 1 .. last`` from the rows' running totals."""
    a, b = rows[first], rows[last]
    return Cost(b["sim_time_s"] - a["sim_time_s"], *(b[f"{k}_total"] - a[f"{k}_total"] for k in ("bytes_up", "bytes_down",
                                                                                                  "energy_j")))


def finished_state(folder: Path) -> tuple[State, list[dict[str, Any]]]:
    return load_checkpoint(folder / CHECKPOINT)[0].state, read_rows(folder / METRICS)[0]


@contextmanager
def open_driver(cfg: RunConfig) -> Iterator[FLDriver]:
    """The run's model, data, network and client path (``FLDriver``), given back as loaded at the end."""
    driver = FLDriver(cfg)
    try:
        yield driver
    finally:
        driver.close()


def save_adapters(driver: FLDriver, state: State, folder: Path) -> dict[str, str]:
    """The state's adapters in PEFT format with their task cards: ``adapter/`` or ``adapters/<name>/``."""
    ctx = driver.ctx
    adapters = ctx.strategy.adapters(state)
    paths = {}
    for name, adapter in adapters.items():
        path = folder / ("adapter" if list(adapters) == [GLOBAL] else f"adapters/{name}")
        save_adapter(ctx.model, adapter, path)
        write_card(path, ctx.task, ctx.cfg.model.name, base_seed(ctx.cfg.model.name, ctx.cfg.seed))
        paths[name] = str(path)
    return paths


# --- the methods ---


def retrain(src: Source, client: int, out: Path, opts: UnlearnOptions) -> Unlearned:
    """A fresh run of the same config without ``client``: the exact reference."""
    summary = run(with_excluded(src.cfg, [client]), out)
    state, rows = finished_state(out)
    return Unlearned("retrain", state, summary["adapters"], cost_between(rows, 0, len(rows) - 1))


def rollback(src: Source, client: int, out: Path, opts: UnlearnOptions) -> Unlearned:
    """Continue from the checkpoint of the round before ``client`` first took part, without it."""
    start = rounds_with(src.rows, client, dropped=True)[0] - 1
    summary = fork(with_excluded(src.cfg, [client]), src.path, start, out)
    state, rows = finished_state(out)
    return Unlearned("rollback", state, summary["adapters"], cost_between(rows, start, len(rows) - 1))


def calibrate(start: State, trained: State, old_start: State, old_received: State) -> State:
    """FedEraser's calibrated update added to ``start``: per tensor the stored update's norm with the
    calibration's direction, start + ||U|| U^ / ||U^|| (U = old_received - old_start, U^ = trained -
    start); a tensor the calibration left unchanged stays at ``start``."""
    out = {}
    for name, s in start.items():
        cal = trained[name] - s
        norm = cal.norm()
        out[name] = s + cal * ((old_received[name] - old_start[name]).norm() / norm) if norm > 0 else s.clone()
    return out


def calibration_train(train: TrainConfig, ratio: float) -> TrainConfig:
    """The local training settings with ``ratio`` of the steps (or epochs), at least one."""
    if train.local_epochs is not None:
        return dataclasses.replace(train, local_epochs=max(1, round(train.local_epochs * ratio)))
    return dataclasses.replace(train, local_steps=max(1, round(train.local_steps * ratio)))


def rebuild_from(src: Source, client: int, driver: FLDriver) -> tuple[State, int]:
    """(state, round) FedEraser rebuilds from: the kept checkpoint of the round before the client first
    took part (nothing of it is in the model yet: exact), else the initial state (the paper's replay
    from the start, which also calibrates the rounds before it)."""
    before = rounds_with(src.rows, client, dropped=True)[0] - 1
    if (src.path / round_file(before)).is_file():
        return load_checkpoint(src.path / round_file(before))[0].state, before
    return driver.initial_state().state, 0


def federaser(src: Source, client: int, out: Path, opts: UnlearnOptions) -> Unlearned:
    """Rebuild the adapters from the other clients' stored updates with calibration training."""
    cfg = src.cfg
    skip = set(cfg.privacy.unlearn.exclude) | {client}
    train = calibration_train(cfg.train, opts.calibration_ratio)
    spent = {"sim_time_s": 0.0, "bytes_up": 0.0, "bytes_down": 0.0, "energy_j": 0.0}
    with open_driver(cfg) as driver:
        ctx = driver.ctx
        state, start = rebuild_from(src, client, driver)
        for r in range(start + 1, cfg.fl.rounds + 1):
            ks = sorted(set(src.rows[r]["clients"]) - skip)
            if not ks:  # no other client's update arrived: the server kept its model
                continue
            stored = load_updates(src.path / updates_file(r))
            links = draw_links(cfg.net, ctx.topology, ks, rng_for(cfg.seed, Purpose.FADING, r))
            seeds = {k: torch_seed_for(cfg.seed, Purpose.TRAIN, r, k) for k in ks}
            jobs = start_jobs(ctx, state, r, ks, links, seeds, 0.0, train)
            updates = [dataclasses.replace(j.update, state=calibrate(j.start, j.update.state, *stored[j.client]))
                       for j in jobs]
            state = ctx.strategy.aggregate(state, filled(updates, ctx.strategy.reduce), r)
            # a synchronous round on the clock: the barrier waits for the slowest calibrating client
            spent["sim_time_s"] += max(j.cost.total_s for j in jobs)
            spent["bytes_up"] += sum(j.cost.bytes_up for j in jobs)
            spent["bytes_down"] += sum(j.cost.bytes_down for j in jobs)
            spent["energy_j"] += sum(j.cost.e_tx_j + j.cost.e_comp_j for j in jobs)
        paths = save_adapters(driver, state, out)
    return Unlearned("federaser", state, paths, Cost(**spent))


def cluster(src: Source, client: int, out: Path, opts: UnlearnOptions) -> Unlearned:
    """Retrain only ``client``'s cluster (fixed by device resources) without it; keep the others."""
    cfg, n = src.cfg, src.cfg.data.num_clients
    assignment = build_strategy(cfg).assignment(src.state, n)
    name = assignment[client]
    outside = [k for k in range(n) if assignment[k] != name]
    skip = set(cfg.privacy.unlearn.exclude) | set(outside) | {client}
    adapter, cost = None, Cost()
    if len(skip) < n:  # the cluster's other members, on their own
        run(with_excluded(cfg, sorted(skip)), out / "run")
        retrained, rows = finished_state(out / "run")
        adapter, cost = get_prefixed(retrained, name), cost_between(rows, 0, len(rows) - 1)
    with open_driver(cfg) as driver:
        if adapter is None:  # the client was its cluster's only member: the cluster's initial adapter
            adapter = get_prefixed(driver.initial_state().state, name)
        state = replace_prefixed(src.state, name, adapter)
        paths = save_adapters(driver, state, out)
    return Unlearned("cluster", state, paths, cost)


Method = Callable[[Source, int, Path, UnlearnOptions], Unlearned]
METHODS: dict[str, Method] = {"retrain": retrain, "rollback": rollback, "federaser": federaser, "cluster": cluster}


def check_method(src: Source, method: str) -> None:
    """Refuse, before anything runs, a method the run kept no material for, naming the setting."""
    cfg, s = src.cfg, src.cfg.fl.strategy
    driver = STRATEGIES[s].driver
    if method not in METHODS:
        raise UnlearnError(f"unknown unlearning method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "rollback" and cfg.privacy.unlearn.checkpoints != "every":
        raise UnlearnError(f"rollback needs the run's per-round checkpoints; {src.path} kept only the last. Run with "
                           f"privacy.unlearn.checkpoints: every, or use --method retrain")
    if method == "rollback" and driver == "async":
        raise UnlearnError(f"rollback needs rounds; '{s}' is asynchronous (a checkpoint may hold the client's update in "
                           f"flight). Use --method retrain")
    if method == "federaser" and not cfg.privacy.unlearn.store_updates:
        raise UnlearnError(f"federaser calibrates from the clients' stored updates; {src.path} kept none. Run with "
                           f"privacy.unlearn.store_updates: true, or use --method retrain")
    if method == "federaser" and s not in FEDERASER_STRATEGIES:
        raise UnlearnError(f"federaser rebuilds adapters that are plain sample-weighted averages ({', '.join(FEDERASER_STRATEGIES)}); "
                           f"'{s}' is not such a scheme. Use --method retrain")
    if method == "cluster" and s in ("ifca", "cfl"):
        raise UnlearnError(f"cluster retrains one cluster, which needs memberships that do not depend on the client's "
                           f"updates; '{s}' forms clusters from every client's updates, K's included. Use --method retrain")
    if method == "cluster" and s != "rescluster":
        raise UnlearnError(f"cluster needs a clustered run with clusters fixed by device resources (fl.strategy: "
                           f"rescluster); '{s}' is not. Use --method retrain")


def _refusal(src: Source, method: str) -> str:
    try:
        check_method(src, method)
    except UnlearnError as exc:
        return str(exc)
    return ""


# --- evaluation ---


def assess(driver: FLDriver, state: State, client: int) -> dict[str, Any]:
    """Loss on ``client``'s training data, the membership-inference attack on it, and utility: the loss
    on every other client's held-out data (each under its own adapter)."""
    ctx = driver.ctx
    ctx.base.apply(ctx.strategy.base_delta(state))
    adapters = ctx.strategy.adapters(state)
    assignment = ctx.strategy.assignment(state, len(ctx.data.clients))
    set_adapter_state(ctx.model, adapters[assignment[client]])
    members, nonmembers = mia_sets(ctx.data, client)
    if not nonmembers:
        raise UnlearnError(f"client {client} has no held-out examples and its tasks no global evaluation examples, so "
                           f"the membership-inference attack has no non-members; run with data.heldout_fraction > 0")
    mia = loss_attack(ctx.task, ctx.model, members, nonmembers)
    forget = ctx.task.metrics(task_sums(ctx.task, ctx.model, members, ctx.cfg.eval.batch_size))["loss"]
    held: dict[str, float] = {}
    for name, adapter in adapters.items():
        set_adapter_state(ctx.model, adapter)
        for c in ctx.data.clients:
            if c.id != client and assignment[c.id] == name and c.heldout:
                held = add_sums(held, task_sums(ctx.task, ctx.model, c.heldout, ctx.cfg.eval.batch_size))
    return {"forget_loss": forget, "mia_auc": mia.auc, "member_loss": mia.member_loss,
            "nonmember_loss": mia.nonmember_loss, "mia_examples": [mia.members, mia.nonmembers],
            "utility_loss": ctx.task.metrics(held)["loss"] if held.get("count") else None}


def unlearn(run_dir: Path, client: int, methods: Sequence[str], out: Path,
            opts: UnlearnOptions = UnlearnOptions()) -> dict[str, Any]:
    """Unlearn ``client`` from the finished run ``run_dir`` by each of ``methods`` into ``out/<method>``,
    beside the exact reference (retrain) unless ``opts.reference`` is off; measure the original and each
    result; write ``out/unlearn.json`` and return the same report."""
    src = open_run(run_dir)
    check_client(src, client)
    asked, skipped = list(dict.fromkeys(methods)), {}
    if asked == ["all"]:  # every method the run kept the material for; the others say why not
        asked = [m for m in METHODS if not _refusal(src, m)]
        skipped = {m: _refusal(src, m) for m in METHODS if m not in asked}
    for m in asked:
        check_method(src, m)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnlearnError(f"--out {out} exists and is not an empty folder; choose a new folder")
    todo = (["retrain"] if opts.reference and "retrain" not in asked else []) + asked
    results = {m: METHODS[m](src, client, out / m, opts) for m in todo}
    ref = results["retrain"].cost if "retrain" in results else cost_between(src.rows, 0, len(src.rows) - 1)
    with open_driver(src.cfg) as driver:
        original = assess(driver, src.state, client)
        measured = {m: assess(driver, u.state, client) for m, u in results.items()}
    report = {
        "run": str(run_dir), "client": client, "first_round": rounds_with(src.rows, client)[0],
        "cost_reference": "retrain" if "retrain" in results else "original run (no reference retraining)",
        "original": original, "skipped": skipped,
        "methods": {m: {**measured[m], "adapters": u.adapters, "cost": dataclasses.asdict(u.cost),
                        "cost_vs_reference": u.cost.relative(ref)} for m, u in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "unlearn.json", json_safe(report))
    return report


def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the comparison table: the original run, then each method."""
    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    headers = ["method", "loss on K", "MIA AUC", "others' loss", "sim time", "bytes", "energy"]
    o = report["original"]
    rows = [["original", f(o["forget_loss"]), f(o["mia_auc"]), f(o["utility_loss"]), "-", "-", "-"]]
    for m, r in report["methods"].items():
        c, rel = r["cost"], r["cost_vs_reference"]
        rows.append([m, f(r["forget_loss"]), f(r["mia_auc"]), f(r["utility_loss"]),
                     f"{c['sim_time_s']:.1f} s x{f(rel['sim_time_s'], '.2f')}",
                     f"{(c['bytes_up'] + c['bytes_down']) / 1e6:.2f} MB x{f(rel['bytes'], '.2f')}",
                     f"{c['energy_j']:.2f} J x{f(rel['energy_j'], '.2f')}"])
    return headers, rows
