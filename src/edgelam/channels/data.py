"""Federated channel-prediction data: each client's own propagation environment, samples for the task.

``data.partition: by_task`` (the default for ``data.source: cdl``) gives client k the CDL profile
``channels.profiles[k % len]``: non-IID by environment, as devices in different places see
different channels; ``iid`` gives every client users of every profile. Evaluation uses fresh
users of each profile in ``channels.eval_profiles`` (default: the training ones; a profile no
client trains on is a zero-shot test), at ``eval_speed_kmh`` when set (speeds never trained on).

Samples (``tasks.channel.CsiSample``): TDD, the first ``past`` slots of the uplink band -> the next
``future`` slots of it; FDD, the same past -> the downlink band (the adjacent subcarriers) over
those next slots. The past carries noise at an SNR drawn from ``snr_db`` per sample (training)
or at ``eval_snr_db`` (evaluation); the target is the clean channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgelam.channels.csi import CsiSet, Environment, add_noise, generate
from edgelam.data.build import ClientData, FederatedData
from edgelam.store import Purpose, rng_for
from edgelam.channels.samples import CsiSample, complex_to_real

EVAL_STREAM = 10_000  # stream ids of evaluation sets start here (clients use 0..num_clients-1)


@dataclass(frozen=True)
class Shape:
    past: int
    future: int
    features_in: int
    features_out: int


def environment(ch: Any, profile: str, eval_set: bool = False) -> Environment:
    speed = ch.eval_speed_kmh if eval_set and ch.eval_speed_kmh is not None else ch.speed_kmh
    return Environment(profile=profile, delay_spread_ns=ch.delay_spread_ns, speed_kmh=tuple(speed),
                       carrier_ghz=ch.carrier_ghz, subcarriers=ch.subcarriers, spacing_khz=ch.spacing_khz,
                       bs_rows=ch.bs_rows, bs_cols=ch.bs_cols, slot_ms=ch.slot_ms, slots=ch.past + ch.future)


def windows(cs: CsiSet, mode: str, past: int, future: int) -> tuple[np.ndarray, np.ndarray]:
    """(past (N, P, S) complex, clean target (N, F, S) complex) of a set."""
    s = cs.env.subcarriers
    band = slice(0, s) if mode == "tdd" else slice(s, 2 * s)
    return cs.h[:, :past, :s], cs.h[:, past: past + future, band]


def samples(cs: CsiSet, ch: Any, snr_db: np.ndarray, rng: np.random.Generator) -> list[CsiSample]:
    past, target = windows(cs, ch.mode, ch.past, ch.future)
    noisy = add_noise(past, snr_db, rng)
    x, y = complex_to_real(torch.from_numpy(noisy)), complex_to_real(torch.from_numpy(np.ascontiguousarray(target)))
    return [CsiSample(x[i], y[i], float(cs.speed_kmh[i]), cs.env.name) for i in range(len(cs))]


def client_set(ch: Any, partition: str, k: int, seed: int) -> list[CsiSample]:
    """Client k's training samples (its environment's users, with training noise)."""
    profiles = [ch.profiles[k % len(ch.profiles)]] if partition == "by_task" else list(ch.profiles)
    users = np.array_split(np.arange(ch.users_per_client), len(profiles))
    rng = rng_for(seed, Purpose.CSI_NOISE, k)
    out: list[CsiSample] = []
    for j, (p, u) in enumerate(zip(profiles, users)):
        if len(u):
            cs = generate(environment(ch, p), len(u), seed, stream=k * len(ch.profiles) + j)
            lo, hi = ch.snr_db
            out += samples(cs, ch, rng.uniform(lo, hi, size=len(cs)), rng)
    keep = max(1, int(round(len(out) * ch.few_shot)))
    return out if keep == len(out) else [out[int(i)] for i in np.sort(rng.choice(len(out), keep, replace=False))]


def eval_sets(ch: Any, seed: int) -> dict[str, list[CsiSample]]:
    out = {}
    for j, p in enumerate(ch.eval_profiles or ch.profiles):
        cs = generate(environment(ch, p, eval_set=True), ch.eval_users, seed, stream=EVAL_STREAM + j)
        rng = rng_for(seed, Purpose.CSI_NOISE, EVAL_STREAM + j)
        out[cs.env.name] = samples(cs, ch, np.full(len(cs), ch.eval_snr_db), rng)
    return out


def build_channel_data(ch: Any, data: Any, seed: int) -> tuple[FederatedData, Shape]:
    """The clients' samples and the evaluation sets of a run (generated once, then cached)."""
    from rich.progress import track

    partition = data.partition if data.partition in ("by_task", "iid") else "by_task"
    clients = [ClientData(k, client_set(ch, partition, k, seed), [])
               for k in track(range(data.num_clients), description="channels", transient=True)]
    evals = eval_sets(ch, seed)
    desc = (f"CDL channels ({ch.mode.upper()}, {ch.carrier_ghz} GHz, {2 * ch.bs_rows * ch.bs_cols} BS antennas, "
            f"{ch.speed_kmh[0]}-{ch.speed_kmh[1]} km/h): {sum(len(c.train) for c in clients)} training samples over "
            f"{len(clients)} clients ({partition}), eval {', '.join(f'{k} {len(v)}' for k, v in evals.items())}")
    shape = Shape(ch.past, ch.future, 2 * ch.subcarriers, 2 * ch.subcarriers)
    return FederatedData(clients, evals, {}, desc), shape
