"""Federated beam-prediction data: DeepMIMO New York users as samples, each cell a data task.

Per base station ``b`` of ``beams.base_stations``: load the scenario (``channels/deepmimo.py``),
give every user its features, its oracle beam on a ``dft_codebook(n_tx, n_beams)`` and every
beam's gain, and hold out ``beams.test_fraction`` of the users (``beams.split_users``, seeded);
the held-out users are the evaluation set "BS<b>" and never any client's.

``data.partition: by_task`` gives client k the training users of ``base_stations[k % len]`` (non-IID
by cell: each cell sees its own streets), shared among the clients of that cell; ``iid`` shares
every cell's training users among all clients. ``beams.users_per_client`` caps a client's share.

Features ``track`` (next beam from past beams, e.g. a user moving along a street): a sample is a
window of ``track_length + 1`` neighbouring users along a grid row (``grid_tracks``): the first
``track_length`` oracle beams in, the last user's oracle beam out. A track is a test sample when its
last user is a test user, a training sample when none of its users is one (so no beam of a test
user reaches a client, not even as an input).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from edgelam.channels.beams import split_users
from edgelam.channels.deepmimo import SCENARIO, Scenario, beam_dataset, grid_tracks, load_scenario
from edgelam.config import DataConfig
from edgelam.config_channels import BeamConfig
from edgelam.data.build import ClientData, FederatedData
from edgelam.data.sources import DataError, data_root
from edgelam.store import Purpose, rng_for, torch_seed_for


@dataclass(frozen=True)
class BeamSample:
    inputs: Tensor  # (F,) float32 features, or (L,) int64 past oracle beams, oldest first (features 'track')
    label: int  # the oracle beam: the argmax of ``gains``
    gains: Tensor  # (n_beams,) float32 every beam's gain |w_i^H h|^2 relative to the oracle beam's (1 there)
    task: str  # the base station, e.g. "BS1"


@dataclass(frozen=True)
class BeamShape:
    n_beams: int
    n_tx: int
    features: str  # position | paths | track
    features_in: int  # F features per sample, or L past beams (track)
    track_length: int


@functools.lru_cache(maxsize=8)
def _load(folder: str, bs: int) -> Scenario:
    return load_scenario(Path(folder), bs)


def scenario(bs: int) -> Scenario:
    """Base station ``bs`` of ``$EDGELAM_DATA/deepmimo_new_york``, read once per process and folder."""
    return _load(str(data_root() / SCENARIO), bs)


def relative_gains(gains: np.ndarray) -> Tensor:
    """(N, B) gains divided by each user's best: the gain loss in dB is unchanged and float32 holds them."""
    return torch.from_numpy((gains / gains.max(axis=1, keepdims=True)).astype(np.float32))


def user_samples(x: np.ndarray, y: np.ndarray, gains: Tensor, users: np.ndarray, task: str) -> list[BeamSample]:
    """One sample per user of ``users``: its features in, its oracle beam out."""
    xt = torch.from_numpy(x)
    return [BeamSample(xt[i], int(y[i]), gains[i], task) for i in users]


def track_samples(tracks: list[np.ndarray], y: np.ndarray, gains: Tensor, task: str) -> list[BeamSample]:
    """One sample per track: the oracle beams of all but its last user in, the last one's out."""
    out = []
    for t in tracks:
        past = torch.from_numpy(y[t[:-1]].astype(np.int64))
        out.append(BeamSample(past, int(y[t[-1]]), gains[t[-1]], task))
    return out


def station_samples(beams: BeamConfig, bs: int, seed: int) -> tuple[list[BeamSample], list[BeamSample]]:
    """(training samples, test samples) of one base station."""
    s = scenario(bs)
    track = beams.features == "track"
    x, y, g = beam_dataset(s, beams.n_tx, beams.n_beams, "position" if track else beams.features)
    gains, task = relative_gains(g), f"BS{bs}"
    train, test = split_users(len(s), beams.test_fraction, seed=torch_seed_for(seed, Purpose.BEAM_SPLIT, bs))
    if not track:
        return user_samples(x, y, gains, train, task), user_samples(x, y, gains, test, task)
    is_test = np.zeros(len(s), dtype=bool)
    is_test[test] = True
    tracks = grid_tracks(s, beams.track_length + 1)
    return (track_samples([t for t in tracks if not is_test[t].any()], y, gains, task),
            track_samples([t for t in tracks if is_test[t[-1]]], y, gains, task))


def shares(pool: list[BeamSample], clients: int, cap: int | None, rng: np.random.Generator) -> list[list[BeamSample]]:
    """``pool`` shuffled and split into ``clients`` near-equal shares, each cut to ``cap`` samples."""
    parts = np.array_split(rng.permutation(len(pool)), clients)
    return [[pool[int(i)] for i in np.sort(p[:cap])] for p in parts]


def partition(pools: dict[int, list[BeamSample]], how: str, num_clients: int, cap: int | None,
              seed: int) -> list[list[BeamSample]]:
    """Each client's training samples: by_task, client k those of the k % len-th base station (a
    station with no client is evaluated only: zero-shot); iid, a share of every station's."""
    if how == "iid":
        pool = [s for p in pools.values() for s in p]
        return shares(pool, num_clients, cap, rng_for(seed, Purpose.BEAM_PARTITION))
    out: list[list[BeamSample]] = [[] for _ in range(num_clients)]
    for j, (bs, pool) in enumerate(pools.items()):
        ks = list(range(j, num_clients, len(pools)))
        if not ks:
            continue
        for k, share in zip(ks, shares(pool, len(ks), cap, rng_for(seed, Purpose.BEAM_PARTITION, bs))):
            out[k] = share
    return out


def build_beam_data(beams: BeamConfig, data: DataConfig, seed: int) -> tuple[FederatedData, BeamShape]:
    """The clients' training samples and each base station's test samples (fixed by ``seed``)."""
    if len(set(beams.base_stations)) < len(beams.base_stations):
        raise DataError(f"beams.base_stations {list(beams.base_stations)} names a base station twice; list each once")
    if data.partition not in ("by_task", "iid"):
        raise DataError(f"data.partition '{data.partition}' is not available for data.source deepmimo; use by_task or iid")
    split = {bs: station_samples(beams, bs, seed) for bs in beams.base_stations}
    parts = partition({bs: tr for bs, (tr, _) in split.items()}, data.partition, data.num_clients,
                      beams.users_per_client, seed)
    for k, part in enumerate(parts):
        if not part:
            raise DataError(f"client {k} received no training samples of DeepMIMO New York: lower data.num_clients "
                            f"or beams.test_fraction, or use data.partition iid")
    evals = {f"BS{bs}": te for bs, (_, te) in split.items()}
    for name, test in evals.items():
        if not test:
            raise DataError(f"{name} has no test track of {beams.track_length + 1} neighbouring users; lower "
                            f"beams.track_length or raise beams.test_fraction")
    desc = (f"DeepMIMO New York beams ({beams.n_tx}-antenna ULA, {beams.n_beams}-beam DFT codebook, "
            f"{beams.features} features): {sum(map(len, parts))} training samples over {len(parts)} clients "
            f"({data.partition}), eval {', '.join(f'{k} {len(v)}' for k, v in evals.items())}")
    features_in = int(next(iter(evals.values()))[0].inputs.numel())  # F, or track_length past beams
    shape = BeamShape(beams.n_beams, beams.n_tx, beams.features, features_in, beams.track_length)
    return FederatedData([ClientData(k, p, []) for k, p in enumerate(parts)], evals, {}, desc), shape
