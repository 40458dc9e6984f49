"""The same FedAvg-LoRA work done four ways, side by side in one process: a bare PyTorch + PEFT loop,
EdgeLAM (clients one after another, and batched), and a Flower 1.42 simulation (Ray backend).

The work: the demo's Dolly clients (``configs/demo.yaml``, 4 clients, all of them every round), LoRA
r = 8 on q/v with dropout 0, 2 local steps of batch 4 at most 128 tokens, the demo's AdamW, warm-up +
cosine schedule and clipping, FedAvg weighted by samples. Every variant reads the same batches in the
same order (``edgelam.fl.client.trip_steps`` with EdgeLAM's per-round, per-client seeds) from the data
EdgeLAM builds, and starts from the same adapter, so the final adapters agree to float rounding
(printed). Reported: wall seconds per round (median, min..max over rounds 1..R of every repeat) and
the ratio to the bare loop; the variants run in turn, the order reversed every other repeat.

What a round's time includes:
  bare             per client: load the global adapter, AdamW, the steps, read the adapter; then FedAvg.
                   The floor. Model and data set-up are not timed.
  edgelam          ``lifecycle.run`` of the demo with the overrides above: from the end of round r-1's
                   training (its metrics row's ``wall_s``; for round 1, the start of the rounds) to the
                   end of round r's training. Included: client selection, planning and checking each
                   trip's bytes and FLOPs, the simulated network and energy accounting, round r-1's
                   checkpoint and metrics line. Excluded: set-up (model, data, round 0's evaluation), the
                   final evaluation (eval.every = R, 1 example per task, no generation) and outputs.
  edgelam-batched  the same with ``runtime.batch_clients=4`` (the 4 clients in one forward / backward).
  flower-*         ``flwr.simulation.run_simulation``: a ServerApp running ``flwr.serverapp.strategy.FedAvg``
                   and 4 SuperNodes, whose ClientApp trains with the bare loop's own function. A round is
                   timed in the ServerApp between the strategy's ``evaluate_fn`` calls (made before round
                   1 and after each round): sampling, messages to and from the Ray actor(s), training,
                   aggregation. Start-up (Ray, the actor pool, the actor's imports and data, and for
                   flower-alive its model) is reported apart: the ServerApp sends every node a "query"
                   message to warm up before round 1. Clients get Flower's default resources
                   (``--client-cpus`` 2), which on a 2-core machine is one actor: clients one at a time.
  flower-rebuild   the ClientApp builds the model (base + LoRA) in every call, as Flower's templates do.
  flower-alive     a module-level cache keeps one PeftModel per actor process (Flower's best case).
Both Flower variants cache the clients' data per actor process, as Flower's templates cache theirs.

    .venv/bin/python benchmarks/vs_flower.py                               # SmolLM2, 3 rounds x 2 repeats
    .venv/bin/python benchmarks/vs_flower.py --model tiny --rounds 2 --repeats 1 --out /tmp/vs.json
    .venv/bin/python benchmarks/vs_flower.py --only bare edgelam flower-alive
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor

from edgelam.config import RunConfig, TrainConfig
from edgelam.config_load import load_config
from edgelam.data.format import collate
from edgelam.data.sources import data_root
from edgelam.fl.client import lr_lambda, trip_steps
from edgelam.models.load import base_seed, fresh_base, load_base
from edgelam.store import Purpose, torch_seed_for
from edgelam.tasks import setup_task

if TYPE_CHECKING:  # flwr is imported where used: FLWR_TELEMETRY_ENABLED must be set before its import
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.app import Context as FlowerContext
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 4
VARIANTS = ("bare", "edgelam", "edgelam-batched", "flower-rebuild", "flower-alive")
State = dict[str, Tensor]


def overrides(model: str, rounds: int, threads: int, batch_clients: int = 1) -> list[str]:
    """The demo made into the benchmark's work (every variant reads its config from these)."""
    return [f"model.name={model}", f"data.num_clients={CLIENTS}", "fl.fraction=1.0", "train.local_steps=2",
            "train.batch_size=4", "data.max_length=128", "model.lora.dropout=0", f"eval.every={rounds}",
            "eval.max_per_task=1", "eval.generate=0", f"fl.rounds={rounds}", f"threads={threads}",
            f"runtime.batch_clients={batch_clients}"]


def config(over: Sequence[str]) -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", list(over))


# --- the bare loop (also the Flower ClientApp's training) ---


def peft_model(cfg: RunConfig, base: torch.nn.Module) -> PeftModel:
    """LoRA on ``base`` with plain PEFT, seeded as EdgeLAM seeds it (so the initial adapters agree)."""
    lora = cfg.model.lora
    settings = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return get_peft_model(base, settings)


def train_trip(model: PeftModel, start: State, steps: Iterable[list[list[Any]]], cfg: TrainConfig, pad_id: int) -> State:
    """One client's trip: load ``start``, AdamW + the schedule over ``steps`` (each a list of micro-batches),
    clipping; return the trained adapter."""
    set_peft_model_state_dict(model, start)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.warmup_steps, cfg.local_steps))
    model.train()
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for samples in step:
            loss = model(**collate(samples, pad_id)).loss / cfg.grad_accum
            loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
    model.eval()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def fedavg(states: Sequence[State], weights: Sequence[int]) -> State:
    """sum_k n_k x_k / sum_k n_k per tensor (McMahan et al. 2017), summed in float64 as EdgeLAM does."""
    total = float(sum(weights))
    return {k: sum((w / total) * s[k].double() for s, w in zip(states, weights)).to(states[0][k].dtype)  # type: ignore[union-attr]
            for k in states[0]}


def bare_rounds(model: PeftModel, init: State, data: Sequence[Sequence[Any]], cfg: RunConfig,
                pad_id: int) -> tuple[list[float], State]:
    state, times = init, []
    for r in range(1, cfg.fl.rounds + 1):
        t0 = time.perf_counter()
        states = [train_trip(model, state, trip_steps(d, cfg.train, torch_seed_for(cfg.seed, Purpose.TRAIN, r, k)),
                             cfg.train, pad_id) for k, d in enumerate(data)]
        state = fedavg(states, [len(d) for d in data])
        times.append(time.perf_counter() - t0)
    return times, state


# --- EdgeLAM ---


def edgelam_rounds(cfg: RunConfig) -> tuple[list[float], State]:
    from edgelam.lifecycle import run  # here, not at the top: the Ray actor imports this file too

    walls: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t_call = time.perf_counter()  # lifecycle.run's own clock starts a few microseconds later
        summary = run(cfg, Path(tmp) / "run", on_start=lambda r, n: walls.append(time.perf_counter() - t_call),
                      on_round=lambda row: walls.append(float(row["wall_s"])))
        final = load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors"))
    return [b - a for a, b in itertools.pairwise(walls)], final


# --- Flower: the ClientApp (its functions are imported by reference in the Ray actor, so caches live there) ---

_DATA: dict[str, tuple[RunConfig, list[Any], int]] = {}  # overrides JSON -> (config, clients' data, pad id)
_MODEL: dict[str, PeftModel] = {}  # flower-alive: overrides JSON -> the actor's one PeftModel
_BUILT = [0]  # models this process built: shows where the cache held (1 per actor) and where it did not


def client_data(over_json: str) -> tuple[RunConfig, list[Any], int]:
    if over_json not in _DATA:
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation chatter, per actor
        cfg = config(json.loads(over_json))
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        ts = setup_task(cfg)
        _DATA[over_json] = (cfg, [c.train for c in ts.data.clients], int(ts.tokenizer.pad_token_id))
    return _DATA[over_json]


def client_model(over_json: str, variant: str) -> PeftModel:
    """flower-rebuild: a new base model + LoRA every call; flower-alive: built once per process."""
    cfg = client_data(over_json)[0]
    name, dtype, seed = cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed)
    if variant == "flower-rebuild":
        _BUILT[0] += 1
        return peft_model(cfg, fresh_base(name, dtype, seed).model)
    if over_json not in _MODEL:
        _BUILT[0] += 1
        _MODEL[over_json] = peft_model(cfg, load_base(name, dtype, seed).model)
    return _MODEL[over_json]


def client_warm_up(msg: Message, context: FlowerContext) -> Message:
    from flwr.app import Message, MetricRecord, RecordDict

    conf = msg.content["config"]
    client_data(str(conf["overrides"]))
    if conf["variant"] == "flower-alive":
        client_model(str(conf["overrides"]), "flower-alive")
    return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid()})}), reply_to=msg)


def client_train(msg: Message, context: FlowerContext) -> Message:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    conf = msg.content["config"]
    over_json, k = str(conf["overrides"]), int(context.node_config["partition-id"])
    cfg, data, pad_id = client_data(over_json)
    model = client_model(over_json, str(conf["variant"]))
    start = {n: t.clone() for n, t in msg.content["arrays"].to_torch_state_dict().items()}
    seed = torch_seed_for(cfg.seed, Purpose.TRAIN, int(conf["server-round"]), k)
    state = train_trip(model, start, trip_steps(data[k], cfg.train, seed), cfg.train, pad_id)
    metrics = MetricRecord({"num-examples": len(data[k]), "pid": os.getpid(), "built": _BUILT[0]})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def client_app() -> ClientApp:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(client_warm_up)
    app.train()(client_train)
    return app


# --- Flower: the ServerApp and the simulation ---


def node_ids(grid: Grid, n: int, timeout_s: float = 60.0) -> list[int]:
    """The simulation registers its nodes while the ServerApp thread starts: wait for all ``n``."""
    deadline = time.monotonic() + timeout_s
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of {n} SuperNodes registered after {timeout_s:.0f} s")
        time.sleep(0.05)
    return ids


def checked(replies: Iterable[Message], n: int, what: str) -> list[Message]:
    """Flower's strategies log a failed ClientApp and go on (FedAvg keeps the old arrays): refuse that here."""
    got = list(replies)
    errors = [m.error.reason for m in got if m.has_error()]
    if errors or len(got) != n:
        raise RuntimeError(f"{what}: {len(got) - len(errors)} of {n} replies; ClientApp errors: {errors[:2]}")
    return got


def flower_rounds(variant: str, over: list[str], init: State, rounds: int, client_cpus: float) -> dict[str, Any]:
    """One simulation; per-round seconds, start-up and tear-down seconds, the final adapter, actors used."""
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation

    # the ClientApp from this file imported as a module: cloudpickle ships __main__'s functions by value
    # (module globals copied into every message), which would empty flower-alive's cache on each call
    mod = sys.modules[__name__] if __name__ != "__main__" else importlib.import_module(Path(__file__).stem)
    out: dict[str, Any] = {"stamps": [], "pids": set(), "built": {}}
    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: FlowerContext) -> None:
        nodes = node_ids(grid, CLIENTS)
        conf = ConfigRecord({"overrides": json.dumps(over), "variant": variant})
        warm = [Message(RecordDict({"config": conf}), dst_node_id=n, message_type="query") for n in nodes]
        out["pids"] |= {int(m.content["metrics"]["pid"]) for m in checked(grid.send_and_receive(warm), CLIENTS, "warm-up")}
        replies: list[int] = []

        def train_metrics(records: list[RecordDict], key: str) -> MetricRecord:
            replies.append(len(records))
            for r in records:
                m = r["metrics"]
                out["pids"].add(int(m["pid"]))  # type: ignore[arg-type]
                out["built"][int(m["pid"])] = int(m["built"])  # type: ignore[arg-type]
            return aggregate_metricrecords(records, key)

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            out["stamps"].append(time.perf_counter())

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=CLIENTS,
                          train_metrics_aggr_fn=train_metrics)
        result = strategy.start(grid, ArrayRecord(init), num_rounds=rounds, train_config=conf, evaluate_fn=stamp)
        if replies != [CLIENTS] * rounds:
            raise RuntimeError(f"{variant}: replies per round {replies}, expected {CLIENTS} each (the log above "
                               f"has the ClientApp's errors)")
        out["final"] = {k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}

    t0 = time.perf_counter()
    try:
        run_simulation(server_app, mod.client_app(), CLIENTS, backend_config={
            "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
            "init_args": {"address": "local"}})  # a Ray of our own, never another user's cluster
    finally:
        if ray.is_initialized():  # Flower shuts Ray down itself unless it failed first
            ray.shutdown()
    stamps = out["stamps"]
    if "final" not in out:
        raise RuntimeError(f"{variant}: the simulation ended without a result (its log above says why)")
    return {"times": [b - a for a, b in itertools.pairwise(stamps)], "startup_s": stamps[0] - t0,
            "teardown_s": time.perf_counter() - stamps[-1], "final": out["final"], "actors": len(out["pids"]),
            "models_built": sum(out["built"].values())}


# --- the comparison ---


def max_diff(a: State, b: State) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"adapters differ in keys: {sorted(a.keys() ^ b.keys())[:3]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def run_variant(v: str, args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """One pass of variant ``v``: its per-round seconds and final adapter (and Flower's extras)."""
    cfg, init = setup["cfg"], setup["init"]
    if v == "bare":
        times, final = bare_rounds(setup["model"], init, setup["data"], cfg, setup["pad_id"])
        return {"times": times, "final": final}
    if v.startswith("edgelam"):
        batch = CLIENTS if v == "edgelam-batched" else 1
        times, final = edgelam_rounds(config(overrides(args.model, args.rounds, args.threads, batch)))
        return {"times": times, "final": final}
    return flower_rounds(v, setup["over"], init, args.rounds, args.client_cpus)


def report(args: argparse.Namespace, times: dict[str, list[float]], finals: dict[str, State], init: State,
           flower: dict[str, dict[str, list[Any]]], data_desc: str) -> dict[str, Any]:
    """Print the table and Flower's start-up line; return the JSON record."""
    ref = "bare" if "bare" in times else args.only[0]
    med = {v: statistics.median(t) for v, t in times.items()}
    diffs = {v: max_diff(finals[ref], finals[v]) for v in times if v != ref}
    moved = max_diff(finals[ref], init)  # training did move the adapter (so agreeing means something)
    print(f"\nper-round wall seconds, {CLIENTS} clients x 2 steps x batch 4 x <=128 tokens; median (min..max) over "
          f"rounds 1..{args.rounds} x {args.repeats} repeats")
    print(f"| variant | s / round | ratio to {ref} | final adapter max abs diff vs {ref} |")
    print("|---|---|---|---|")
    for v, t in times.items():
        print(f"| {v} | {med[v]:.3f} ({min(t):.3f}..{max(t):.3f}) | {med[v] / med[ref]:.2f} | "
              f"{'-' if v == ref else f'{diffs[v]:.1e}'} |")
    print(f"the {ref} adapter moved {moved:.1e} (max abs) from the start")
    for v, f in flower.items():
        actors = sorted(set(f["actors"]))
        print(f"{v}: start-up {statistics.median(f['startup_s']):.1f} s (Ray, actors, their imports, data"
              f"{', model' if v == 'flower-alive' else ''}), tear-down {statistics.median(f['teardown_s']):.1f} s; "
              f"num_cpus {args.client_cpus:g} per client -> {actors} actor(s): clients "
              f"{'one at a time' if actors == [1] else 'in parallel'}; models built {f['models_built']} per repeat "
              f"({args.rounds * CLIENTS} trips each)")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads, torch {torch.__version__}"
    return {"date": datetime.date.today().isoformat(), "machine": machine,
            "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
            "data": data_desc, "model": args.model, "rounds": args.rounds, "repeats": args.repeats,
            "work": {"clients": CLIENTS, "local_steps": 2, "batch_size": 4, "max_length": 128, "lora_r": 8},
            "flower_client_cpus": args.client_cpus, "reference": ref,
            "seconds_per_round": {v: summary(t) | {"ratio": med[v] / med[ref], "all": t} for v, t in times.items()},
            "flower": {v: {k: summary(x) if k.endswith("_s") else x for k, x in f.items()} for v, f in flower.items()},
            "max_abs_diff": diffs, "moved_from_start": moved}


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, or tiny for a quick check")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the variants")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every variant (and Flower's actor)")
    ap.add_argument("--client-cpus", type=float, default=2.0, help="Flower's client_resources num_cpus (its default: 2)")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--verbose", action="store_true", help="Flower's INFO log")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "vs_flower.json")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read on flwr's import; it posts usage events by default
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args.verbose:
        importlib.import_module("flwr.supercore.logger")  # sets its level on import: quiet it after
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ["EDGELAM_DATA"] = str(data_root().resolve())  # the same data wherever Ray starts its workers
    torch.set_num_threads(args.threads)

    # --- set-up, untimed: the data EdgeLAM builds, the bare loop's model and the initial adapter ---
    over = overrides(args.model, args.rounds, args.threads)
    cfg = config(over)
    ts = setup_task(cfg)
    model = peft_model(cfg, fresh_base(cfg.model.name, cfg.model.dtype, base_seed(cfg.model.name, cfg.seed)).model)
    init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    setup = {"cfg": cfg, "over": over, "model": model, "init": init, "data": [c.train for c in ts.data.clients],
             "pad_id": int(ts.tokenizer.pad_token_id)}
    print(f"{ts.data.description}; clients' samples {[len(d) for d in setup['data']]}; model {args.model}, "
          f"{args.rounds} rounds x {args.repeats} repeats, {args.threads} threads", flush=True)

    # --- the passes, the order reversed every other one ---
    times: dict[str, list[float]] = {v: [] for v in args.only}
    finals: dict[str, State] = {}
    flower: dict[str, dict[str, list[Any]]] = {}
    for rep in range(args.repeats):
        for v in (args.only if rep % 2 == 0 else list(reversed(args.only))):
            t0 = time.perf_counter()
            res = run_variant(v, args, setup)
            times[v] += res["times"]
            finals[v] = res["final"]
            if v.startswith("flower"):
                f = flower.setdefault(v, {"startup_s": [], "teardown_s": [], "actors": [], "models_built": []})
                for key in f:
                    f[key].append(res[key])
            print(f"  repeat {rep + 1} {v}: rounds {' '.join(f'{t:.2f}' for t in res['times'])} s "
                  f"(whole run {time.perf_counter() - t0:.1f} s)", flush=True)

    record = report(args, times, finals, init, flower, ts.data.description)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
