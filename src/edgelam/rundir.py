"""The run folder, one lifecycle for every driver: config, metrics rows, checkpoint, adapters, summary, plots.

    <out>/config.yaml                   the run's config as resolved (the one a resume reads)
    <out>/metrics.jsonl                 one row per round, round 0 first; appended and fsync'd
    <out>/state/checkpoint.safetensors  the RunState after the last committed round, with the
                                        config it was made under (a resume refuses another one)
    <out>/state/rounds/<r>.safetensors  the same after round r (privacy.unlearn.checkpoints: every)
    <out>/state/updates/<r>.safetensors each client's start and received adapter of round r
                                        (privacy.unlearn.store_updates; synchronous rounds)
    <out>/adapter/ | adapters/<name>/   PEFT-format adapters, swapped in whole
    <out>/summary.json, plots/          written at the end

The commit order is: the round's updates, the row (fsync), the round's checkpoint, the checkpoint.
A run killed at any point resumes from the checkpoint and drops the rows past it; a row missing
before it, a damaged row or a changed config is refused with one line naming the problem, and no
file is touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

from edgelam.store import atomic_write_bytes, atomic_write_json, atomic_write_text, to_json_line

log = logging.getLogger("edgelam.run")

CHECKPOINT = "state/checkpoint.safetensors"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
# Settings a resumed run may change: how far it goes and what it prints at the end.
RESUMABLE_KEYS = ("fl.rounds", "threads", "eval.generate", "eval.max_new_tokens", "runtime.*", "report.*")
# A fork (``RunFolder.fork``) may also add clients to the exclusion: its rounds up to the fork never
# selected them, and exclusion drops them from the same selection draws, so those rounds are what a
# run started with the new exclusion computes (``fork`` checks the rows); later rounds run without them.
FORKABLE_KEYS = (*RESUMABLE_KEYS, "privacy.unlearn.exclude")
ROUNDS = "state/rounds"
UPDATES = "state/updates"

State = dict[str, Tensor]


class RunFolderError(ValueError):
    """A run folder cannot be created, resumed or written as asked."""


class TrainingDiverged(RunFolderError):
    """A loss became NaN or infinite: the round is not committed."""


@dataclass
class RunState:
    """Everything a resumed run needs beyond the config: saved after every committed round."""

    round: int
    sim_time_s: float
    state: State  # the strategy's flat server state (adapters, optimizer moments, assignments)
    totals: dict[str, float] = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "energy_j": 0.0})
    aux: State = field(default_factory=dict)  # driver tensors (asynchronous: updates in flight; split: queues)
    aux_meta: dict[str, Any] = field(default_factory=dict)  # driver facts (asynchronous: jobs in flight)


def zero_row() -> dict[str, Any]:
    """Round 0's metrics line before its evaluation: nothing trained, sent or spent yet."""
    keys = ("bytes_up", "bytes_down", "bytes_backhaul_up", "bytes_backhaul_down", "energy_j")
    zeros = {k: 0 for k in keys} | {f"{k}_total": 0 for k in keys}
    return {"round": 0, "sim_time_s": 0.0, "round_time_s": 0.0, "train_loss": None, **zeros, "clients": [],
            "client_stats": [], "wall_s": 0.0}


# --- config fingerprint ---


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def pinned(config: dict[str, Any], free: tuple[str, ...] = RESUMABLE_KEYS) -> dict[str, Any]:
    """The settings a resumed run must keep (all but ``free``; ``section.*``: all of a section), flattened to dotted keys."""
    return {k: v for k, v in _flat(config).items()
            if k not in free and not any(f.endswith(".*") and k.startswith(f[:-1]) for f in free)}


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(pinned(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_drift(saved: dict[str, Any], now: dict[str, Any], free: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """'key: old -> new' for every pinned setting that differs."""
    a, b = pinned(saved, free), pinned(now, free)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# --- checkpoint ---


def save_checkpoint(path: Path, st: RunState, config: dict[str, Any], disk_full: bool = False) -> None:
    # safetensors stores names sorted; the order is kept so a resumed run iterates (and so sums,
    # e.g. a gradient norm over parameters) in the same order as the uninterrupted one
    meta = {"round": st.round, "sim_time_s": st.sim_time_s, "totals": st.totals, "aux": st.aux_meta,
            "config": config, "fingerprint": fingerprint(config), "order": {"state": list(st.state), "aux": list(st.aux)}}
    tensors = {f"state.{k}": v.detach().clone() for k, v in st.state.items()}  # clusters may share storage
    tensors |= {f"aux.{k}": v.detach().clone() for k, v in st.aux.items()}
    blob = save(tensors, metadata={"edgelam": json.dumps(meta)})
    atomic_write_bytes(path, blob, len(blob) // 2 if disk_full else None)


def load_checkpoint(path: Path) -> tuple[RunState, dict[str, Any] | None]:
    """The saved state and the config it was made under (None for checkpoints older than that)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["edgelam"])
        tensors = load_file(str(path))
        part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in ("state", "aux")}
        order = meta.get("order", {})
        part = {p: {k: part[p][k] for k in order.get(p, [])} | part[p] for p in part}
        st = RunState(meta["round"], meta["sim_time_s"], part["state"], meta["totals"], part["aux"], meta.get("aux", {}))
        config = meta.get("config")
        if not (type(st.round) is int and st.round >= 0 and isinstance(st.sim_time_s, (int, float))
                and isinstance(st.totals, dict) and isinstance(st.aux_meta, dict) and isinstance(config, (dict, type(None)))):
            raise ValueError("its metadata is not a checkpoint's (round, sim_time_s, totals, aux, config)")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise RunFolderError(f"{path} is damaged ({type(exc).__name__}: {exc}); the run cannot resume from it. "
                             f"Start a new run with --out, or restore the file") from None
    return st, config


def round_file(round_idx: int) -> str:
    return f"{ROUNDS}/{round_idx:05d}.safetensors"


def updates_file(round_idx: int) -> str:
    return f"{UPDATES}/{round_idx:05d}.safetensors"


def kept_rounds(path: Path) -> list[int]:
    """The rounds whose checkpoint ``path`` (a run folder) kept under state/rounds/, in order."""
    folder = path / ROUNDS
    return sorted(int(p.stem) for p in folder.glob("*.safetensors") if p.stem.isdigit()) if folder.is_dir() else []


# --- stored updates (privacy.unlearn.store_updates) ---

Updates = dict[int, tuple[State, State]]  # client -> (adapter it started from, adapter the server received)


def updates_bytes(updates: Updates) -> bytes:
    """Keys ``<client>.start.<name>`` and ``<client>.update.<name>``; the names' order is kept."""
    tensors: State = {}
    order: dict[str, list[str]] = {}
    for k in sorted(updates):
        for part, adapter in zip(("start", "update"), updates[k]):
            tensors |= {f"{k}.{part}.{n}": v.detach().contiguous().clone() for n, v in adapter.items()}
            order[f"{k}.{part}"] = list(adapter)
    return save(tensors, metadata={"edgelam": json.dumps({"clients": sorted(updates), "order": order})})


def load_updates(path: Path) -> Updates:
    """What ``updates_bytes`` wrote: client -> (start, received), in client order."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["edgelam"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is damaged or missing ({type(exc).__name__}: {exc})") from None

    def part(k: int, name: str) -> State:
        return {n: tensors[f"{k}.{name}.{n}"] for n in meta["order"][f"{k}.{name}"]}

    return {int(k): (part(k, "start"), part(k, "update")) for k in meta["clients"]}


# --- metrics rows ---


def read_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, torn): every row of metrics.jsonl; only a damaged *last* line (a kill mid-write) is
    dropped and reported as torn. A damaged line before it is an error naming the line."""
    if not path.exists():
        return [], False
    lines = path.read_text(errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise ValueError("not a metrics row")
        except (ValueError, RecursionError) as exc:
            if i == len(lines):
                return rows, True
            raise RunFolderError(f"{path} line {i} is damaged ({exc}); rows after it would be lost. Repair or remove "
                                 f"that line by hand, or start a new run with --out") from None
        rows.append(row)
    return rows, False


def _finite(x: Any) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


def json_safe(obj: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers, and summary.json must parse anywhere."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj if _finite(obj) else None


def check_finite(row: dict[str, Any]) -> None:
    """Refuse to commit a round whose losses are NaN or infinite (training diverged)."""
    bad = [k for k in ("train_loss", "eval_loss") if row.get(k) is not None and not _finite(row[k])]
    if bad:
        raise TrainingDiverged(
            f"round {row['round']}: {' and '.join(bad)} became {row[bad[0]]} (training diverged); the round was not "
            f"saved. Lower train.lr or set train.max_grad_norm, and start a new run")


def _excluded(config: dict[str, Any]) -> set[int]:
    return set(config.get("privacy", {}).get("unlearn", {}).get("exclude", []))


def _check_exclusion(rows: list[dict[str, Any]], config: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a fork that takes a client out of the exclusion, or newly excludes one its rows include
    (trained, or dropped: a dropped client still held a share of the band that round)."""
    back = _excluded(saved) - _excluded(config)
    if back:
        raise RunFolderError(f"a fork may add clients to privacy.unlearn.exclude, not take client {min(back)} out: the "
                             f"rounds before the fork ran without it. Start a new run instead")
    new = _excluded(config) - _excluded(saved)
    for r in rows:
        seen = new & set(r.get("clients", []) + r.get("dropped", []))
        if seen:
            raise RunFolderError(f"client {min(seen)} took part in round {r['round']}, so a fork after that round "
                                 f"cannot exclude it; fork from a round before it")


def _copy_rounds(src: Path, out: Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """Rows, kept round checkpoints (re-saved under ``config``) and stored updates up to the fork."""
    atomic_write_text(out / METRICS, "".join(to_json_line(json_safe(r)) + "\n" for r in rows))
    last = rows[-1]["round"]
    for r in kept_rounds(src):
        if r <= last:
            save_checkpoint(out / round_file(r), load_checkpoint(src / round_file(r))[0], config)
    for r in range(last + 1):
        if (src / updates_file(r)).is_file():
            atomic_write_bytes(out / updates_file(r), (src / updates_file(r)).read_bytes())


class RunFolder:
    """One run's folder. ``create`` for a new run, ``open`` to resume; then ``start``, ``commit``
    per round, ``replace_dir`` for adapters and ``write_summary`` at the end."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path, self.config = path, config
        self.rows: list[dict[str, Any]] = []
        self.keep_rounds = False  # privacy.unlearn.checkpoints: every (set by the lifecycle)
        self.store_updates = False  # privacy.unlearn.store_updates
        self.made = False  # ``create`` made the folder itself
        self.disk_full_at: int | None = None  # faults.disk_full_at: the checkpoint of this round meets a full disk
        self.skipped: list[int] = []  # rounds whose checkpoint a full disk stopped (the previous one stayed whole)
        self._lock_fh: Any = None

    @classmethod
    def create(cls, path: Path, config: dict[str, Any]) -> "RunFolder":
        """A new run: ``path`` must not exist, or be an empty folder."""
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {path} is a file, not a folder; choose a new folder name")
        if path.is_dir() and (path / METRICS).exists():
            raise RunFolderError(f"--out {path} already holds a run; resume it with `edgelam run --resume {path}` "
                                 f"or choose another folder")
        if path.is_dir() and any(path.iterdir()):
            raise RunFolderError(f"--out {path} is a folder with other files in it; a run writes config.yaml, summary.json "
                                 f"and plots/ there and would overwrite them. Choose a new or empty folder")
        folder = cls(path, config)
        folder.made = not path.exists()
        folder._write(lambda: atomic_write_text(path / CONFIG, yaml.safe_dump(config, sort_keys=False)))
        return folder

    @classmethod
    def open(cls, path: Path, config: dict[str, Any]) -> "RunFolder":
        if not (path / CONFIG).is_file():
            raise RunFolderError(f"--resume {path}: no config.yaml there; is it an EdgeLAM run folder?")
        return cls(path, config)

    def lock(self) -> None:
        """Hold an exclusive lock on config.yaml while this process runs in the folder: a second
        ``--resume`` of a running run is refused instead of appending the same rounds twice."""
        self._lock_fh = open(self.path / CONFIG, "rb")
        if fcntl is None:  # no advisory locks on this platform
            return
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise RunFolderError(f"{self.path} is in use by another edgelam process (its config.yaml is locked); "
                                 f"wait for that run to end or stop it, then resume") from None

    def close(self) -> None:
        """Release the folder's lock (the lifecycle calls this when the run ends, however it ends)."""
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def discard(self) -> None:
        """Undo ``create`` for a run that never started (its model or data failed to load): no
        half-made folder is left to block the next try with the same --out."""
        self.close()
        (self.path / CONFIG).unlink(missing_ok=True)
        if self.made and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def _write(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> RunFolderError:
        fix = (f"the last checkpoint is whole: free space and resume with `edgelam run --resume {self.path}`"
               if exc.errno == errno.ENOSPC else "choose a writable --out")
        return RunFolderError(f"cannot write the run folder {self.path}: {exc.strerror or exc} "
                              f"({exc.filename or self.path}); {fix}")

    # --- resume ---

    def resume(self, initial: Callable[[], RunState]) -> RunState:
        """The state to continue from (``initial()`` for a new run) and ``self.rows`` up to it."""
        ckpt = self.path / CHECKPOINT
        rows, torn = read_rows(self.path / METRICS)
        if not ckpt.exists():
            if rows:
                raise RunFolderError(f"{ckpt} is missing but metrics.jsonl holds {len(rows)} rows; the run cannot resume. "
                                     f"Restore the checkpoint, or start a new run with --out")
            return initial()
        st, saved = load_checkpoint(ckpt)
        if saved is not None:
            drift = config_drift(saved, self.config)
            if drift:
                raise RunFolderError(f"the config differs from the one {self.path} was started with ({'; '.join(drift[:4])}); "
                                     f"a resumed run keeps its config (only {', '.join(RESUMABLE_KEYS)} may change). "
                                     f"Start a new run with --out to change it")
        kept = [r for r in rows if r["round"] <= st.round]
        missing = sorted(set(range(st.round + 1)) - {r["round"] for r in kept})
        if missing:
            raise RunFolderError(f"{self.path / METRICS} lacks the rows of rounds {missing} although the checkpoint is at "
                                 f"round {st.round}; resuming would leave a gap. Restore metrics.jsonl, or start a new run")
        if torn or len(kept) != len(rows):  # drop rows past the checkpoint (recomputed identically) and a torn tail
            self._write(lambda: atomic_write_text(self.path / METRICS, "".join(to_json_line(r) + "\n" for r in kept)))
        self.rows = kept
        return st

    # --- commit ---

    def append(self, row: dict[str, Any]) -> None:
        """Append one metrics row and fsync it: it is on disk before the checkpoint that follows."""
        def write() -> None:
            with open(self.path / METRICS, "a") as fh:
                fh.write(to_json_line(json_safe(row)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

        self._write(write)
        self.rows.append(row)

    def checkpoint(self, st: RunState) -> None:
        """A full disk here is survived: the previous checkpoint stays whole (the write goes to a
        temporary file), the round is noted in ``skipped`` and the next round tries again; a resume
        from the older checkpoint recomputes the rounds after it identically."""
        drill = st.round == self.disk_full_at
        if drill:
            self.disk_full_at = None  # the drill fills the disk once
        try:
            save_checkpoint(self.path / CHECKPOINT, st, self.config, drill)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise self._error(exc) from None
            log.warning("the checkpoint of round %d was not written (%s); the run goes on from memory and the last "
                        "checkpoint stays whole", st.round, exc.strerror)
            self.skipped.append(st.round)

    def commit(self, st: RunState, row: dict[str, Any], updates: Updates | None = None) -> None:
        """A finished round: refuse NaN losses, then the round's updates (if kept), the row, the
        round's checkpoint (if kept), then the checkpoint. The checkpoint comes last, so a run killed
        before it recomputes the round and rewrites the round's files identically."""
        check_finite(row)
        if self.store_updates and updates is not None:
            self.write_bytes(updates_file(st.round), updates_bytes(updates))
        self.append(row)
        if self.keep_rounds:
            self._write(lambda: save_checkpoint(self.path / round_file(st.round), st, self.config))
        self.checkpoint(st)

    # --- fork ---

    @classmethod
    def fork(cls, src: Path, round_idx: int, out: Path, config: dict[str, Any]) -> "RunFolder":
        """A new run folder ``out`` holding ``src`` as it was after round ``round_idx`` (rows, round
        checkpoints, stored updates) under ``config``, which may differ in FORKABLE_KEYS only (see
        there); ``lifecycle.run(..., resume=True)`` continues it."""
        ckpt = src / round_file(round_idx)
        if not (src / CONFIG).is_file():
            raise RunFolderError(f"{src}: no config.yaml there; is it an EdgeLAM run folder?")
        if not ckpt.is_file():
            raise RunFolderError(f"{src} kept no checkpoint of round {round_idx} ({ckpt}); a run keeps one per round "
                                 f"with privacy.unlearn.checkpoints: every")
        st, saved = load_checkpoint(ckpt)
        drift = config_drift(saved or {}, config, FORKABLE_KEYS)
        if drift:
            raise RunFolderError(f"a fork of {src} may change only {', '.join(FORKABLE_KEYS)}; this config also changes "
                                 f"{'; '.join(drift[:4])}")
        rows = [r for r in read_rows(src / METRICS)[0] if r["round"] <= round_idx]
        if [r["round"] for r in rows] != list(range(round_idx + 1)):
            raise RunFolderError(f"{src / METRICS} lacks rows of rounds 0..{round_idx}; it cannot be forked there")
        _check_exclusion(rows, config, saved or {})
        folder = cls.create(out, config)
        folder._write(lambda: _copy_rounds(src, out, rows, config))
        folder.checkpoint(st)
        folder.rows = rows
        return folder

    # --- outputs ---

    def replace_dir(self, rel: str, write: Callable[[Path], None]) -> Path:
        """Write a folder (an adapter) under a temporary name, then swap it in whole."""
        path = self.path / rel
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")

        def go() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)

        self._write(go)
        return path

    def write_bytes(self, rel: str, data: bytes) -> Path:
        self._write(lambda: atomic_write_bytes(self.path / rel, data))
        return self.path / rel

    def write_text(self, rel: str, text: str) -> Path:
        self._write(lambda: atomic_write_text(self.path / rel, text))
        return self.path / rel

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write(lambda: atomic_write_json(self.path / "summary.json", json_safe(summary)))
