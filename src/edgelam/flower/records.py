"""A trip as Flower records and back: ``ClientWork`` down, ``ClientResult`` up, exactly.

Tensor dicts (start, payload, base delta, each IFCA candidate; the trained state) travel as
``ArrayRecord``s, one ``Array`` per tensor holding its raw bytes (C order, the machine's byte order:
little-endian on every platform torch ships for) with the dtype named as torch names it, so
bfloat16 and float16 adapters cross unchanged (Flower's own numpy encoding has no bfloat16).
Scalars travel in a ``ConfigRecord``; the ``TrainConfig``, DP-SGD's settings and the run's config
as JSON strings. A reply is checked field by field: a malformed one is a ``RecordError`` that
names the record and the key, never a half-read result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from edgelam.config import TrainConfig
from edgelam.fl.client import ClientUpdate
from edgelam.fl.executor import ClientResult, ClientWork
from edgelam.privacy.dpsgd import DPSGD

State = dict[str, torch.Tensor]
STYPE = "edgelam.raw"  # Array.stype: the tensor's bytes as torch holds them
CANDIDATE = "candidate:"  # RecordDict key prefix of an IFCA candidate adapter
FLOAT = (int, float)


class RecordError(ValueError):
    """Records that do not hold what a trip's work or result must hold."""


# --- tensors ---


def to_arrays(state: State) -> ArrayRecord:
    """One raw-bytes ``Array`` per tensor, in the dict's order."""
    out = ArrayRecord()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=STYPE, data=data)
    return out


def from_arrays(rec: Any, where: str) -> State:
    """The tensors of ``to_arrays``; any other record or a wrong byte count is a ``RecordError``."""
    if not isinstance(rec, ArrayRecord):
        raise RecordError(f"{where} is a {type(rec).__name__}, expected an ArrayRecord of tensors")
    return {name: _tensor(arr, f"{where}['{name}']") for name, arr in rec.items()}


def _tensor(arr: Array, where: str) -> torch.Tensor:
    dtype = getattr(torch, arr.dtype, None) if arr.dtype.isidentifier() else None
    if arr.stype != STYPE or not isinstance(dtype, torch.dtype):
        raise RecordError(f"{where}: dtype '{arr.dtype}' / stype '{arr.stype}' is not a tensor EdgeLAM sent "
                          f"(expected a torch dtype name and stype '{STYPE}')")
    shape = tuple(arr.shape)
    size = math.prod(shape) * dtype.itemsize
    if len(arr.data) != size:
        raise RecordError(f"{where}: {len(arr.data)} bytes for a {dtype} tensor of shape {list(shape)} "
                          f"({size} bytes expected)")
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(arr.data), dtype=torch.uint8).view(dtype).reshape(shape)


# --- checked fields ---


def _config(rd: RecordDict, key: str, where: str) -> ConfigRecord:
    if key not in rd:
        raise RecordError(f"{where} has no '{key}' record (it has {sorted(rd)})")
    rec = rd[key]
    if not isinstance(rec, ConfigRecord):
        raise RecordError(f"{where}['{key}'] is a {type(rec).__name__}, expected a ConfigRecord")
    return rec


def _get(rec: ConfigRecord, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in rec:
        raise RecordError(f"{where} has no '{key}'")
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise RecordError(f"{where}['{key}'] is {type(value).__name__} {value!r}, expected {names}")
    return value


def _json(rec: ConfigRecord, key: str, where: str) -> Any:
    text = _get(rec, key, str, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}['{key}'] is not JSON: {exc}") from None


def _arrays(rd: RecordDict, key: str, where: str) -> State:
    if key not in rd:
        raise RecordError(f"{where} has no '{key}' record (it has {sorted(rd)})")
    return from_arrays(rd[key], f"{where}['{key}']")


# --- the work (down) ---


def work_records(work: ClientWork, config_json: str) -> RecordDict:
    """What the server sends: the work and the run's config (JSON), from which a client rebuilds its Context."""
    meta = ConfigRecord({
        "client": work.client, "version": work.version, "name": work.name, "seed": work.seed,
        "prox_mu": work.prox_mu, "train": json.dumps(dataclasses.asdict(work.train)),
        "dpsgd": json.dumps(dataclasses.asdict(work.dpsgd) if work.dpsgd is not None else None),
        "candidates": json.dumps(None if work.candidates is None else list(work.candidates)),
        "config": config_json,
    })
    rd = RecordDict({"work": meta, "start": to_arrays(work.start), "payload": to_arrays(work.payload),
                     "base_delta": to_arrays(work.base_delta)})
    for name, adapter in (work.candidates or {}).items():
        rd[CANDIDATE + name] = to_arrays(adapter)
    return rd


def records_work(rd: RecordDict) -> tuple[ClientWork, str]:
    """The work and the run's config JSON of ``work_records``."""
    where = "the train message"
    meta = _config(rd, "work", where)
    w = f"{where}['work']"
    names = _json(meta, "candidates", w)
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise RecordError(f"{w}['candidates'] must be null or a list of adapter names, got {names!r}")
    try:
        train = TrainConfig(**_json(meta, "train", w))
        dp = _json(meta, "dpsgd", w)
        dpsgd = DPSGD(**dp) if dp is not None else None
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{w}: bad train / dpsgd settings: {exc}") from None
    candidates = None if names is None else {n: _arrays(rd, CANDIDATE + n, where) for n in names}
    work = ClientWork(client=_get(meta, "client", int, w), version=_get(meta, "version", int, w),
                      name=_get(meta, "name", str, w), start=_arrays(rd, "start", where),
                      payload=_arrays(rd, "payload", where), candidates=candidates,
                      base_delta=_arrays(rd, "base_delta", where), seed=_get(meta, "seed", int, w), train=train,
                      prox_mu=_get(meta, "prox_mu", FLOAT, w), dpsgd=dpsgd)
    return work, _get(meta, "config", str, w)


# --- the result (up) ---


def result_records(res: ClientResult) -> RecordDict:
    """What a client sends back: the trained adapter, the adapter it started from, and the counts."""
    u = res.update
    meta = ConfigRecord({
        "client": u.client, "num_samples": u.num_samples, "train_loss": u.train_loss, "steps": u.steps,
        "tokens": u.tokens, "flops": u.flops, "adapter": u.adapter, "unsent": sorted(u.unsent),
        "dp_steps": json.dumps([list(s) for s in u.dp_steps]), "probe_flops": res.probe_flops,
    })
    return RecordDict({"result": meta, "state": to_arrays(u.state), "start": to_arrays(res.start)})


def records_result(rd: RecordDict, client: int | None = None) -> ClientResult:
    """The ``ClientResult`` of ``result_records``; ``client``: the trip's client, which the reply must name."""
    where = "the reply" if client is None else f"client {client}'s reply"
    meta = _config(rd, "result", where)
    w = f"{where}['result']"
    got = _get(meta, "client", int, w)
    if client is not None and got != client:
        raise RecordError(f"{where} carries client {got}'s result")
    unsent = _get(meta, "unsent", list, w)
    if not all(isinstance(k, str) for k in unsent):
        raise RecordError(f"{w}['unsent'] must list adapter keys (strings), got {unsent!r}")
    dp = _json(meta, "dp_steps", w)
    if not (isinstance(dp, list) and all(isinstance(s, list) and len(s) == 3 for s in dp)):
        raise RecordError(f"{w}['dp_steps'] must be a list of [q, sigma, steps], got {dp!r}")
    update = ClientUpdate(client=got, state=_arrays(rd, "state", where), num_samples=_get(meta, "num_samples", int, w),
                          train_loss=_get(meta, "train_loss", FLOAT, w), steps=_get(meta, "steps", int, w),
                          tokens=_get(meta, "tokens", int, w), flops=_get(meta, "flops", FLOAT, w),
                          adapter=_get(meta, "adapter", str, w), unsent=frozenset(unsent),
                          dp_steps=tuple((q, sigma, int(n)) for q, sigma, n in dp))
    return ClientResult(update=update, start=_arrays(rd, "start", where),
                        probe_flops=_get(meta, "probe_flops", FLOAT, w))
