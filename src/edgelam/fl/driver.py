"""The federated driver: every non-split scheme runs here, on the simulated clock of the wireless network.

Synchronous rounds: the strategy selects clients; each client is a simpy process that downloads
the global adapter (downlink time), trains for real (simulated duration = counted FLOPs / device
FLOP/s) and uploads its update (serialized bytes / uplink rate); the round ends when the last one
arrives (or at ``fl.deadline_s``); the strategy aggregates. Hierarchical rounds run the edge tier
first (``fl/hierarchy.py``); asynchronous schemes have no rounds (``fl/events.py``). The strategy
class says which (``driver``); the run folder around the rounds is ``lifecycle.run``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import simpy
from safetensors.torch import save

from edgelam.config import RunConfig
from edgelam.fl.context import Context, baseline_row, evaluate, population, setup, task_adapters
from edgelam.fl.evaluate import generate_answers
from edgelam.fl.batched import local_executor
from edgelam.fl.executor import Executor
from edgelam.data.poison import malicious_clients
from edgelam.fl.attacks import build_attack
from edgelam.fl.signing import Uplink, keyring_for
from edgelam.fl.transforms import build_chain
from edgelam.fl.events import run_async
from edgelam.fl.hierarchy import HierResult, run_hier_round
from edgelam.fl.rounds import aggregate_input, filled, metrics_row, population_by_adapter, privacy_row, run_round
from edgelam.fl.rounds import select_clients
from edgelam.privacy.mechanism import Facts, Privacy, load_ledger, save_ledger
from edgelam.fl.strategies.base import GLOBAL
from edgelam.models.load import base_seed
from edgelam.models.lora import AdapterState, get_adapter_state, save_adapter, set_adapter_state
from edgelam.rundir import RunFolder, RunState
from edgelam.store import Purpose, rng_for, to_json_line
from edgelam.tasks.serving import write_card

Commit = Callable[[dict[str, Any]], None]
Wall = Callable[[], float]


def run_sync(ctx: Context, st: RunState, commit: Commit, wall: Wall) -> None:
    """Synchronous rounds: select, train on the clock (barrier or deadline), aggregate, commit."""
    cfg = ctx.cfg
    for r in range(st.round + 1, cfg.fl.rounds + 1):
        env = simpy.Environment(initial_time=st.sim_time_s)
        res = run_round(env, ctx, st, select_clients(ctx, r), r)
        updates = aggregate_input(ctx, st, res, r)
        new_state = ctx.strategy.aggregate(st.state, updates, r) if updates else st.state
        via_cloud = cfg.net.server_tier == "cloud"  # then every transfer also crosses the backhaul
        sent = res.jobs + res.rejected + res.lost
        backhaul = (sum(j.cost.bytes_up for j in sent), sum(j.cost.bytes_down for j in sent + res.dropped))
        row = metrics_row(st, r, res.jobs, res.end_time_s, wall(), res.dropped, backhaul=backhaul if via_cloud else (0, 0),
                          rejected=res.rejected, lost=res.lost)
        if res.secagg is not None:
            row["secagg"] = res.secagg
        st.state, st.sim_time_s, st.round = new_state, res.end_time_s, r
        commit(row | privacy_row(ctx, st) | received(ctx, res.jobs))


def run_hier(ctx: Context, st: RunState, commit: Commit, wall: Wall) -> None:
    """Hierarchical rounds: the edge tier on the clock, then one cloud aggregation per round."""
    cfg = ctx.cfg
    for r in range(st.round + 1, cfg.fl.rounds + 1):
        env = simpy.Environment(initial_time=st.sim_time_s)
        hres = run_hier_round(env, ctx, st, select_clients(ctx, r), r)
        updates = hier_input(ctx, st, hres, r)
        new_state = ctx.strategy.aggregate(st.state, updates, r) if updates else st.state
        ok = [j for j in hres.jobs if j.accepted]
        row = metrics_row(st, r, ok, hres.end_time_s, wall(), backhaul=hres.backhaul,
                          rejected=[j for j in hres.jobs if j.rejected], lost=[j for j in hres.jobs if j.lost])
        if hres.secagg is not None:
            row["secagg"] = hres.secagg
        st.state, st.sim_time_s, st.round = new_state, hres.end_time_s, r
        commit(row | privacy_row(ctx, st) | received(ctx, ok))


def hier_input(ctx: Context, st: RunState, hres: HierResult, round_idx: int) -> list[Any]:
    """The cloud's aggregation input: the edge models, or under central DP with the noise at the
    cloud the noised mean of every device's clipped update (fl.hier.kappa2 = 1: the edges forward
    their devices' sums); the round's privacy is recorded in the ledger."""
    if ctx.privacy is None:
        return filled(hres.edge_updates, ctx.strategy.reduce)
    ledger = load_ledger(st.aux_meta)
    dp = ctx.privacy.dp
    if dp.mode == "central" and dp.noise_at == "cloud" and not ctx.cfg.privacy.secagg.enabled:
        updates = ctx.privacy.release(ledger, [j for j in hres.jobs if j.accepted], [], population_by_adapter(ctx, st.state),
                                      ctx.strategy.adapters(st.state), round_idx, record=False)
    else:
        updates = filled(hres.edge_updates, ctx.strategy.reduce)
    ctx.privacy.record_hier(ledger, hres.jobs)
    save_ledger(st.aux_meta, ledger)
    return updates


def received(ctx: Context, jobs: list[Any]) -> dict[str, Any]:
    """With ``privacy.unlearn.store_updates``: each client's start and received update, under the
    row's private key ``_updates`` (the lifecycle stores them for FedEraser and drops the key)."""
    if not ctx.cfg.privacy.unlearn.store_updates:
        return {}
    return {"_updates": {j.client: (j.start, j.update.state) for j in jobs}}


def make_executor(ctx: Context) -> Executor:
    """The executor ``runtime.*`` names: this process (``fl/batched.local_executor``: clients one after
    another, or ``runtime.batch_clients`` of them per forward), or a pool of Ray actors
    (``fl/ray_executor.py``), each running this process's executor."""
    if ctx.cfg.runtime.executor == "ray":
        from edgelam.fl.ray_executor import RayExecutor  # imports ray only when asked for

        return RayExecutor(ctx.cfg)
    return local_executor(ctx)


ADVANCE: dict[str, Callable[[Context, RunState, Commit, Wall], None]] = {
    "sync": run_sync, "hier": run_hier, "async": run_async,
}


class FLDriver:
    """The federated schemes' side of a run: set-up, evaluation, the rounds, the adapters at the end."""

    def __init__(self, cfg: RunConfig, executor: Callable[[Context], Any] | None = None) -> None:
        self.ctx = setup(cfg)
        ctx = self.ctx
        if cfg.privacy.dp.on:
            n = len(ctx.data.clients)
            active = ctx.strategy.select(0, n, rng_for(cfg.seed, Purpose.SELECT, 0))
            facts = Facts(population(ctx).latency_s, [len(c.train) for c in ctx.data.clients],
                          [k for k in active if k not in cfg.privacy.unlearn.exclude])
            ctx.privacy = Privacy(cfg, facts, ctx.strategy.driver)
        ctx.chain = ((ctx.privacy.transforms() if ctx.privacy else []) + build_chain(cfg.fl)
                     + build_attack(cfg.fl.attack, len(ctx.data.clients), cfg.seed))  # malicious clients send last
        ctx.executor = (executor or make_executor)(ctx)
        tamper = cfg.fl.attack.kind == "tamper" and cfg.fl.attack.fraction > 0
        if cfg.fl.keys is not None or tamper:
            n = len(ctx.data.clients)
            ctx.link = Uplink(keyring_for(cfg.fl.keys, n),
                              malicious_clients(n, cfg.fl.attack.fraction, cfg.seed) if tamper else frozenset(), cfg.seed)

    def initial_state(self) -> RunState:
        ctx = self.ctx
        return RunState(0, 0.0, ctx.strategy.init_state(get_adapter_state(ctx.model), population(ctx)))

    def baseline(self, st: RunState) -> dict[str, Any]:
        return baseline_row(self.ctx, st)

    def evaluate(self, st: RunState) -> dict[str, Any]:
        return evaluate(self.ctx, st)

    def diagnostics(self, st: RunState) -> dict[str, float]:
        return self.ctx.strategy.diagnostics(st.state)

    def advance(self, st: RunState, commit: Commit, wall: Wall) -> None:
        ADVANCE[self.ctx.strategy.driver](self.ctx, st, commit, wall)

    def outputs(self, st: RunState, folder: RunFolder) -> dict[str, Any]:
        """Final adapters (PEFT format), FLoRA's merged base delta, sample answers."""
        ctx = self.ctx
        adapters = ctx.strategy.adapters(st.state)
        delta = ctx.strategy.base_delta(st.state)
        ctx.base.apply(delta)
        if delta:  # FLoRA merges into the base: the exact result is this dense delta per module
            folder.write_bytes("base_delta.safetensors", save({k: v.contiguous() for k, v in delta.items()}))
        paths = {}
        seed = base_seed(ctx.cfg.model.name, ctx.cfg.seed)

        def write(tmp: Path, state: AdapterState) -> None:
            save_adapter(ctx.model, state, tmp)
            write_card(tmp, ctx.task, ctx.cfg.model.name, seed)  # what `edgelam serve` rebuilds the model from

        for name, adapter in adapters.items():
            rel = "adapter" if list(adapters) == [GLOBAL] else f"adapters/{name}"
            paths[name] = folder.replace_dir(rel, lambda tmp, a=adapter: write(tmp, a))  # type: ignore[misc]
        if ctx.cfg.eval.generate:
            folder.write_text("samples.jsonl", "".join(to_json_line(a) + "\n" for a in self._answers(st, adapters)))
        out = {"data": ctx.data.description, "adapter": str(next(iter(paths.values()))),
               "adapters": {k: str(v) for k, v in paths.items()}}
        if ctx.privacy is not None:  # the privacy spent over the whole run, in the summary and its table
            out |= privacy_row(ctx, st)
        return out

    def _answers(self, st: RunState, adapters: dict[str, Any]) -> list[dict[str, Any]]:
        ctx = self.ctx
        by_task = task_adapters(ctx, ctx.strategy.assignment(st.state, len(ctx.data.clients)))
        picks = [ex for xs in ctx.data.eval_examples.values() for ex in xs[:1]][: ctx.cfg.eval.generate]
        answers = []
        for ex in picks:
            set_adapter_state(ctx.model, adapters[by_task[ex.task]])
            answers += generate_answers(ctx.model, ctx.tokenizer, [ex], ctx.cfg.eval.max_new_tokens)
        return answers

    def close(self) -> None:
        close = getattr(self.ctx.executor, "close", None)
        if close is not None:  # a pool's workers (Ray actors) go with the run
            close()
        self.ctx.base.apply({})  # give the shared base model back as loaded, without LoRA layers
        self.ctx.model.unload()
