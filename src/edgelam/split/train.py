"""A split round on the simulated clock (simpy: SFL-V2's server copy is a lock) and its real training in
the order the server served the steps; every step's bytes are checked against the plan."""

from __future__ import annotations

from dataclasses import dataclass

import simpy
import torch

from edgelam.config import RunConfig
from edgelam.fl.client import lr_lambda
from edgelam.rundir import RunState
from edgelam.models.split import Params
from edgelam.split import scheduling
from edgelam.split.scheduling import DeviceLoad
from edgelam.split.step import DEV, DOWN, SRV, UP, leaves, step
from edgelam.store import Purpose, torch_seed_for


from edgelam.split.context import DevicePlan, SplitContext

# --- the simulated round ---


@dataclass(frozen=True)
class Timeline:
    finish_s: dict[int, float]  # each scheduled device's end (relative to the round start)
    order: list[tuple[int, int]]  # (device, step) in the order the server served them
    server_wait_s: dict[int, float]  # time spent queueing for the shared server copy (SFL-V2)


def simulate(ctx: SplitContext, plans: dict[int, DevicePlan], loads: dict[int, DeviceLoad], shares: dict[int, float],
             shared_server: bool) -> Timeline:
    env = simpy.Environment()
    lock = simpy.Resource(env, capacity=1)
    radio, srv_speed = ctx.radio, ctx.cfg.split.server_flops_per_s
    finish: dict[int, float] = {}
    waits: dict[int, float] = {}
    order: list[tuple[int, int]] = []

    def device(k: int):  # type: ignore[no-untyped-def]
        ld, dev, beta = loads[k], ctx.topology.devices[k], shares[k]
        up = scheduling.rate_bps(beta, radio.uplink_hz, ld.tx_power_w, ld.gain, radio.noise_w_per_hz)
        down = scheduling.rate_bps(beta, radio.downlink_hz, radio.server_power_w, ld.gain, radio.noise_w_per_hz)
        wait = 0.0
        yield env.timeout(8 * plans[k].adapter_bytes / down)
        for s, sp in enumerate(plans[k].steps):
            srv_phases = [i for i, ph in enumerate(sp.phases) if ph.kind == SRV]
            req = None
            for i, ph in enumerate(sp.phases):
                if srv_phases and i == srv_phases[0]:
                    asked = env.now
                    req = lock.request() if shared_server else None
                    if req is not None:
                        yield req
                    wait += env.now - asked
                    order.append((k, s))
                dur = {DEV: ph.amount / dev.flops_per_s, SRV: ph.amount / srv_speed,
                       UP: 8 * ph.amount / up, DOWN: 8 * ph.amount / down}[ph.kind]
                yield env.timeout(dur)
                if req is not None and i == srv_phases[-1]:
                    lock.release(req)
                    req = None
            if not srv_phases:
                order.append((k, s))
        yield env.timeout(8 * plans[k].adapter_bytes / up)
        finish[k], waits[k] = env.now, wait

    for k in sorted(plans):
        env.process(device(k))
    env.run()
    return Timeline(finish, order, waits)


class Side:
    """One party's trainable tensors with its own AdamW, schedule and clipping."""

    def __init__(self, parts: dict[str, Params], cfg: RunConfig, total_steps: int) -> None:
        self.parts = parts
        self.params = [t for ps in parts.values() for t in ps.values()]
        self.max_norm = cfg.train.max_grad_norm
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay) if self.params else None
        self.sched = (torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, total_steps))
                      if self.opt else None)

    def zero(self) -> None:
        for t in self.params:
            t.grad = None

    def update(self) -> None:
        if self.opt is None or self.sched is None:
            return
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.sched.step()
        self.zero()  # SFL-V1 holds a server copy per device; with full server blocks their gradients add up

    def state(self) -> Params:
        """The trained tensors, detached (not copied: the side is done with them after the round)."""
        return {f"{seg}.{n}": t.detach() for seg, ps in self.parts.items() for n, t in ps.items()}


@dataclass
class Trained:
    device_states: dict[int, Params]
    server_states: dict[int, Params]  # V1: one per device; V2: the shared one under key -1
    losses: dict[int, list[float]]
    correct: dict[int, int]
    seen: dict[int, int]
    bytes: dict[str, int]


def sides(state: Params) -> tuple[Params, Params]:
    """(device-side, server-side) tensors of a run state, their names without the prefix."""
    dev = {k[len("device."):]: v for k, v in state.items() if k.startswith("device.")}
    return dev, {k[len("server."):]: v for k, v in state.items() if k.startswith("server.")}


def train_round(ctx: SplitContext, r: int, st: RunState, plans: dict[int, DevicePlan], order: list[tuple[int, int]],
                shared_server: bool) -> Trained:
    """Real training of the scheduled devices' steps in the server's order."""
    cfg, sm = ctx.cfg, ctx.sm
    dev_state, srv_state = sides(st.state)
    devices = {k: Side({s: leaves(dev_state, s) for s in ("front", "back")}, cfg, len(p.steps)) for k, p in plans.items()}
    if shared_server:
        one = Side({"middle": leaves(srv_state, "middle")}, cfg, sum(len(p.steps) for p in plans.values()))
        servers = {k: one for k in plans}
    else:
        servers = {k: Side({"middle": leaves(srv_state, "middle")}, cfg, len(p.steps)) for k, p in plans.items()}
    out = Trained({}, {}, {k: [] for k in plans}, {k: 0 for k in plans}, {k: 0 for k in plans}, {})
    torch.manual_seed(torch_seed_for(cfg.seed, Purpose.SPLIT_DROPOUT, r))  # dropout
    sm.peft.train()
    sm.back.train()
    try:
        for k, s in order:
            batch, want = plans[k].batches[s], plans[k].steps[s]
            dev, srv = devices[k], servers[k]
            dev.zero()
            srv.zero()
            res = step(sm, dev.parts, srv.parts["middle"], batch, cfg.split.act_codec, cfg.split.grad_codec, ctx.task)
            got_up = res.bytes.get("act_up", 0) + res.bytes.get("mask_up", 0) + res.bytes.get("grad_up", 0)
            got_down = res.bytes.get("feat_down", 0) + res.bytes.get("grad_down", 0)
            if (got_up, got_down) != (want.total(UP), want.total(DOWN)):
                raise RuntimeError(f"device {k} step {s}: sent {(got_up, got_down)} bytes (up, down) but planned "
                                   f"{(want.total(UP), want.total(DOWN))}; a planning bug, please report it")
            dev.update()
            srv.update()
            out.losses[k].append(res.loss)
            out.correct[k] += res.correct
            out.seen[k] += int(sm.inputs(batch)[1].shape[0])
            for name, n in res.bytes.items():
                out.bytes[name] = out.bytes.get(name, 0) + n
    finally:
        sm.peft.eval()
        sm.back.eval()
    out.device_states = {k: d.state() for k, d in devices.items()}
    out.server_states = {-1: servers[next(iter(plans))].state()} if shared_server else {k: s.state() for k, s in servers.items()}
    return out


