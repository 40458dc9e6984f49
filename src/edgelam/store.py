"""Atomic file writes and run-folder helpers: a run killed at any moment never leaves a torn file."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, full_after: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then rename.
    ``full_after``: a fault drill, the disk fills after that many bytes (ENOSPC mid-write)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if full_after is not None:
                fh.write(data[:full_after])
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: faults.disk_full_at)", tmp)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (no NaN or infinity: pass such values through ``rundir.json_safe`` first)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a torn last line (a run killed mid-write)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class Purpose(IntEnum):
    """What a random draw is for: the first key after the seed, so no two purposes share a stream.

    The values the recorded experiments used are kept, so they reproduce. Two are shared on
    purpose: SPLIT_DROPOUT / SPLIT_SCHEDULE (split driver, keyed by round) alias ASYNC_TRAIN /
    ASYNC_FADING (asynchronous driver, keyed by client and trip); the two drivers never meet in
    one run and their key lengths differ, so their streams do not collide.
    """

    PLACEMENT = 1  # device positions and hardware
    FADING = 2  # (round): small-scale fading of a synchronous round
    TRAIN = 3  # (round, client[, edge round]): a client's batches and LoRA dropout
    SELECT = 4  # (round): client sampling
    ASYNC_TRAIN = 5  # (client, trip)
    ASYNC_FADING = 6  # (client, trip)
    EDGE_FADING = 7  # (round, edge, edge round): hierarchical device links
    DP_NOISE = 60  # differential privacy's Gaussian noise (privacy/mechanism.py keys its own draws)
    SECAGG = 61  # (round, edge): secure aggregation's client secrets and who goes silent
    ATTACK = 62  # malicious clients (fl/attacks.py): who they are, their noise
    FAULT = 63  # injected faults (fl/faults.py): which trips drop out or straggle, and where
    SPLIT_DROPOUT = 5  # (round): dropout during a split round's steps (alias, see above)
    SPLIT_SCHEDULE = 6  # (round): the random baseline scheduler (alias, see above)
    CLASS_POOL = 20  # classification data: the training pool
    CLASS_PARTITION = 21
    CLASS_TEST = 22
    CSI_SPEED = 30  # (stream): generated channels: UE speeds and directions
    CSI_SIONNA = 31  # (stream): the seed handed to Sionna
    CSI_NOISE = 32  # (client or eval stream): noise on the past CSI, few-shot subsampling
    BEAM_SPLIT = 40  # (base station): DeepMIMO users held out for evaluation
    BEAM_PARTITION = 41  # (base station; none for iid): training users shared out among clients
    SENSING_FOLDS = 50  # Wi-Fi recordings dealt into folds
    SENSING_SIM = 51  # (client or eval stream): generated activity windows
    SENSING_PARTITION = 52  # training recordings / windows shared out among clients
    SENSING_CODEBOOK = 53  # the vq codebook's k-means
    EVAL_SPLIT = 101  # text data: global evaluation examples per task
    PARTITION = 102  # text data: clients' shares
    HELDOUT = 103  # (client): a client's held-out examples
    SYNTHETIC = 200  # (task, stream): EdgeLAM's synthetic task families


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator that depends only on (seed, *keys): resumed runs redraw the same numbers."""
    return np.random.default_rng([seed, *keys])


def torch_seed_for(seed: int, *keys: int) -> int:
    return int(rng_for(seed, *keys).integers(0, 2**62))
