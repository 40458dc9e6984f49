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
from edgelam.fl.executor import LocalExecutor
from edgelam.fl.transforms import build_chain
from edgelam.fl.events import run_async
from edgelam.fl.hierarchy import run_hier_round
from edgelam.fl.rounds import filled, metrics_row, run_round
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
        selected = ctx.strategy.select(r, len(ctx.data.clients), rng_for(cfg.seed, Purpose.SELECT, r))
        res = run_round(env, ctx, st, selected, r)
        new_state = ctx.strategy.aggregate(st.state, filled([j.update for j in res.jobs], ctx.strategy.reduce), r) if res.jobs else st.state
        via_cloud = cfg.net.server_tier == "cloud"  # then every transfer also crosses the backhaul
        backhaul = (sum(j.cost.bytes_up for j in res.jobs), sum(j.cost.bytes_down for j in res.jobs + res.dropped))
        row = metrics_row(st, r, res.jobs, res.end_time_s, wall(), res.dropped, backhaul=backhaul if via_cloud else (0, 0))
        st.state, st.sim_time_s, st.round = new_state, res.end_time_s, r
        commit(row)


def run_hier(ctx: Context, st: RunState, commit: Commit, wall: Wall) -> None:
    """Hierarchical rounds: the edge tier on the clock, then one cloud aggregation per round."""
    cfg = ctx.cfg
    for r in range(st.round + 1, cfg.fl.rounds + 1):
        env = simpy.Environment(initial_time=st.sim_time_s)
        selected = ctx.strategy.select(r, len(ctx.data.clients), rng_for(cfg.seed, Purpose.SELECT, r))
        hres = run_hier_round(env, ctx, st, selected, r)
        new_state = ctx.strategy.aggregate(st.state, filled(hres.edge_updates, ctx.strategy.reduce), r)
        row = metrics_row(st, r, hres.jobs, hres.end_time_s, wall(), backhaul=hres.backhaul)
        st.state, st.sim_time_s, st.round = new_state, hres.end_time_s, r
        commit(row)


ADVANCE: dict[str, Callable[[Context, RunState, Commit, Wall], None]] = {
    "sync": run_sync, "hier": run_hier, "async": run_async,
}


class FLDriver:
    """The federated schemes' side of a run: set-up, evaluation, the rounds, the adapters at the end."""

    def __init__(self, cfg: RunConfig) -> None:
        self.ctx = setup(cfg)
        self.ctx.chain = build_chain(cfg.fl)
        self.ctx.executor = LocalExecutor(self.ctx)

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
        return {"data": ctx.data.description, "adapter": str(next(iter(paths.values()))),
                "adapters": {k: str(v) for k, v in paths.items()}}

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
        self.ctx.base.apply({})  # give the shared base model back as loaded, without LoRA layers
        self.ctx.model.unload()
