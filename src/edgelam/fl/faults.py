"""Injected client faults (``faults``): drop-outs mid-trip and stragglers, drawn per trip.

A trip is download, local training, upload. A dropped trip stops at a uniform point of one phase:
the client has received that share of the model (download), done that share of its training
(train) or sent that share of its update (upload), and is gone. What it spent up to then is
charged (bytes, time, energy) and listed in the metrics line's ``faults``; its update never
reaches the server, which learns of the drop when the connection goes (the round does not wait
for it). A straggling trip's training takes ``slowdown`` times as long (the same work, so the
same energy): behind a synchronous deadline it is dropped as late, under asynchrony it arrives
stale.

Draws depend only on (seed, the trip's training seed), so a resumed run redraws them identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgelam.config_schemes import DROP_PHASES, FaultConfig
from edgelam.net.topology import ClientCost
from edgelam.store import Purpose, rng_for

PHASES = DROP_PHASES[:3]  # download, train, upload


@dataclass(frozen=True)
class Fault:
    """What happened to one trip: ``phase`` it dropped in and how far through it (None: arrived),
    and whether its training straggled."""

    phase: str | None = None
    share: float = 1.0
    straggled: bool = False

    def report(self, client: int) -> dict[str, object]:
        return {"client": client, "phase": self.phase, "share": round(self.share, 4)}


def draw(cfg: FaultConfig, seed: int, trip_seed: int) -> Fault:
    """The fault of the trip trained with ``trip_seed`` (none when faults are off)."""
    if not cfg.on:
        return Fault()
    rng = rng_for(seed, Purpose.FAULT, trip_seed % 2**62)
    u_drop, u_phase, share, u_slow = rng.random(4)
    straggled = bool(u_slow < cfg.straggle)
    if u_drop >= cfg.drop:
        return Fault(straggled=straggled)
    phase = PHASES[int(u_phase * 3)] if cfg.drop_phase == "any" else cfg.drop_phase
    return Fault(phase, float(share), straggled)


def apply(cost: ClientCost, fault: Fault, slowdown: float) -> ClientCost:
    """The trip's cost with the fault: a straggler's training slowed; a dropped trip cut where it
    stopped (later phases cost nothing)."""
    if fault.straggled:
        cost = dataclasses.replace(cost, t_comp_s=cost.t_comp_s * slowdown)
    if fault.phase is None:
        return cost
    u = fault.share
    if fault.phase == "download":
        return dataclasses.replace(cost, t_down_s=cost.t_down_s * u, bytes_down=int(cost.bytes_down * u), t_comp_s=0.0,
                                   e_comp_j=0.0, t_up_s=0.0, e_tx_j=0.0, bytes_up=0, flops=0.0)
    if fault.phase == "train":
        return dataclasses.replace(cost, t_comp_s=cost.t_comp_s * u, e_comp_j=cost.e_comp_j * u, t_up_s=0.0, e_tx_j=0.0,
                                   bytes_up=0, flops=cost.flops * u)
    return dataclasses.replace(cost, t_up_s=cost.t_up_s * u, e_tx_j=cost.e_tx_j * u, bytes_up=int(cost.bytes_up * u))
