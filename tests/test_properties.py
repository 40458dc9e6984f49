"""Property tests (Hypothesis) for everything that reads input it does not control: configs and overrides,
data files, CSI captures, and the bytes peers send (inference wire, secure aggregation messages, request
bodies). Each either gives a value or raises the module's own error, never another exception."""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgelam.config import ConfigError, RunConfig
from edgelam.config_load import config_from_dict, load_config
from edgelam.data.format import encode
from edgelam.data.sources import FORMAT_KEYS, DataError, convert, read_records
from edgelam.infer.gateway import BadRequest, GatewayState, check_options, max_new_tokens
from edgelam.infer.service import predict_request
from edgelam.infer.wire import WireError, pack, unpack
from edgelam.models.load import byte_tokenizer
from edgelam.privacy import secagg
from edgelam.rundir import RunFolderError, RunState, load_checkpoint, read_rows, save_checkpoint
from edgelam.privacy.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer
from edgelam.split import wire as split_wire

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix="edgelam-props-"))  # files the examples write (one name, rewritten)
atexit.register(shutil.rmtree, TMP, True)
DEEP = b"[" * 100_000  # nested past Python's recursion limit (found: RecursionError from json / yaml)


def dotted_keys(cls: typing.Any, prefix: str = "") -> list[str]:
    """Every setting of the run config as a dotted key (model.lora.r, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        out += dotted_keys(inner[0], f"{prefix}{f.name}.") if inner else [prefix + f.name]
    return out


KEYS = dotted_keys(RunConfig)
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 20) | st.sampled_from([2**63, 10**400, -10**400])
           | st.floats()
           | st.sampled_from(["fedavg", "dirichlet", "iid", "synthetic", "files", "tiny", "auto", "mean", ""])
           | st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def with_setting(data: dict[str, typing.Any], key: str, value: typing.Any) -> dict[str, typing.Any]:
    out = json.loads(json.dumps(data))
    node = out
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def loads_or_config_error(fn: typing.Callable[[], typing.Any]) -> None:
    try:
        assert isinstance(fn(), RunConfig)
    except ConfigError as exc:
        assert str(exc)  # a message naming the problem


def mutated(blob: bytes) -> st.SearchStrategy[bytes]:
    """``blob`` with a few bytes flipped, cut short, or with bytes inserted."""
    if not blob:
        return st.just(b"")

    def flip(at: list[tuple[int, int]]) -> bytes:
        b = bytearray(blob)
        for i, x in at:
            b[i % len(b)] ^= x or 1
        return bytes(b)

    return (st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(flip)
            | st.integers(0, len(blob) - 1).map(lambda n: blob[:n])
            | st.tuples(st.integers(0, len(blob)), st.binary(min_size=1, max_size=16)).map(lambda t: blob[:t[0]] + t[1] + blob[t[0]:]))


# --- configs ---

@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), values), min_size=1, max_size=3))
def test_config_dicts_load_or_raise_config_error(settings_: list[tuple[str, typing.Any]]) -> None:
    data = TINY
    for key, value in settings_:
        assume(key and all(key.split(".")))
        data = with_setting(data, key, value)
    loads_or_config_error(lambda: config_from_dict(data))


@FAST
@given(st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=20), st.booleans())
@example("fl.rounds", "[1, 2", True)  # found: yaml.YAMLError escaped
@example("train.lr", str(10**400), True)  # found: OverflowError (an int no float holds)
@example("fl.rounds", DEEP.decode(), True)
def test_override_strings_load_or_raise_config_error(key: str, raw: str, with_equals: bool) -> None:
    override = f"{key}={raw}" if with_equals else key + raw
    loads_or_config_error(lambda: config_from_dict(TINY, [override]))


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.builds(lambda b, i: (REPO / "configs" / "tiny.yaml").read_bytes()[:i] + b, st.binary(max_size=8),
                   st.integers(0, 600)))
@example(DEEP)
def test_config_files_of_any_bytes_load_or_raise_config_error(content: bytes) -> None:
    path = TMP / "config.yaml"
    path.write_bytes(content)
    loads_or_config_error(lambda: load_config(path))


# --- data files ---

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
format_keys = st.sampled_from(sorted({k for keys in FORMAT_KEYS.values() for k in keys} | {"role", "content", "category"}))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                           "content": st.text(max_size=12) | json_values}), max_size=4)
records = st.dictionaries(format_keys, st.text(max_size=20) | json_values | messages, max_size=4) | json_values


@FAST
@given(st.lists(records, max_size=5), st.sampled_from(["array", "lines"]), st.sampled_from(["auto", *FORMAT_KEYS]),
       st.integers(16, 64))
def test_data_records_give_examples_or_data_error(rows: list[typing.Any], layout: str, fmt: str, max_length: int) -> None:
    path = TMP / "data.json"
    path.write_text(json.dumps(rows) if layout == "array" else "\n".join(json.dumps(r) for r in rows))
    tok = byte_tokenizer()
    try:
        examples = convert(read_records(path), fmt, None, str(path))
        encoded = [encode(ex, tok, max_length) for ex in examples]
    except DataError as exc:
        assert str(exc)
        return
    assert all(len(e.input_ids) == len(e.labels) <= max_length for e in encoded)


@FAST
@given(st.binary(max_size=300))
@example(DEEP)
@example(b'{"text": ' + DEEP + b"}")
def test_data_files_of_any_bytes_give_records_or_data_error(content: bytes) -> None:
    path = TMP / "data.jsonl"
    path.write_bytes(content)
    try:
        rows = read_records(path)
    except DataError:
        return
    assert all(isinstance(r, dict) for _, r in rows)


def _csi_sample(pattern: str) -> bytes | None:
    from conftest import data_dir

    found = sorted((data_dir() / "wifi_csi" / "labelled_2020").rglob(pattern))
    return found[0].read_bytes()[:6000] if found else None


@pytest.mark.parametrize("reader, pattern", [("wifi.read_intel", "intel/**/*.dat"), ("nexmon.read_nexmon", "pi/*.pcap")])
def test_csi_captures_of_any_bytes_read_or_raise_data_error(reader: str, pattern: str) -> None:
    from edgelam.sensing import nexmon, wifi

    read = {"wifi.read_intel": wifi.read_intel, "nexmon.read_nexmon": nexmon.read_nexmon}[reader]
    sample = _csi_sample(pattern) or b""

    @settings(max_examples=40, deadline=None)
    @given(st.binary(max_size=400) | mutated(sample))
    def check(content: bytes) -> None:
        path = TMP / ("csi" + pattern[-5:].replace("*", ""))
        path.write_bytes(content)
        try:
            read(path)
        except DataError as exc:
            assert str(exc)

    check()


# --- run folders: metrics rows and checkpoints ---

@FAST
@given(st.binary(max_size=200) | st.lists(json_values.map(json.dumps), max_size=4).map(lambda ls: "\n".join(ls).encode()))
@example(b'{"round": 0}\n' + DEEP + b"\n{\"round\": 1}\n")
def test_metrics_rows_of_any_bytes_read_or_raise_run_folder_error(content: bytes) -> None:
    path = TMP / "metrics.jsonl"
    path.write_bytes(content)
    try:
        rows, torn = read_rows(path)
    except RunFolderError as exc:
        assert "is damaged" in str(exc)
        return
    assert all(type(r["round"]) is int for r in rows)


def _checkpoint() -> bytes:
    path = TMP / "ckpt.safetensors"
    save_checkpoint(path, RunState(2, 1.5, {"w": torch.ones(2, 2)}, aux={"q": torch.zeros(3)}), TINY)
    return path.read_bytes()


CHECKPOINT = _checkpoint()


def with_meta(meta: typing.Any) -> bytes:
    from safetensors.torch import save

    return save({"state.w": torch.ones(2)}, metadata={"edgelam": json.dumps(meta)})


@settings(max_examples=80, deadline=None)
@given(mutated(CHECKPOINT) | st.binary(max_size=100)
       | st.dictionaries(st.sampled_from(["round", "sim_time_s", "totals", "aux", "config", "order"]), json_values).map(with_meta))
@example(with_meta({"round": 1}))  # found: KeyError after the damage check
@example(with_meta({"round": "2", "sim_time_s": 0, "totals": {}, "config": []}))
def test_checkpoints_of_any_bytes_load_or_raise_run_folder_error(content: bytes) -> None:
    path = TMP / "checkpoint.safetensors"
    path.write_bytes(content)
    try:
        st_, config = load_checkpoint(path)
    except RunFolderError as exc:
        assert "is damaged" in str(exc)
        return
    assert type(st_.round) is int and st_.round >= 0 and isinstance(config, (dict, type(None)))


# --- bytes from peers: the inference wire ---

VALID = pack({"hidden": torch.randn(1, 3, 8), "input_ids": torch.tensor([[1, 2, 3]])}, {"session": "s", "position": 4})


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | mutated(VALID))
def test_inference_wire_decodes_or_raises_wire_error(data: bytes) -> None:
    try:
        tensors, meta = unpack(data)
    except WireError as exc:
        assert "safetensors" in str(exc) or "metadata" in str(exc)
        return
    assert isinstance(meta, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())


json_meta = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.sampled_from([torch.float32, torch.float16, torch.int64]),
       json_meta)
def test_inference_wire_round_trips(shape: list[int], dtype: torch.dtype, meta: dict[str, typing.Any]) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    got, back = unpack(pack({"x": t}, meta))
    assert back == meta and torch.equal(got["x"], t.float() if t.is_floating_point() else t)


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.sampled_from(split_wire.CODECS),
       st.floats(1e-3, 1e4))
def test_split_wire_counts_its_bytes_and_int8_error_is_half_a_step(shape: list[int], codec: str, scale: float) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * scale
    w = split_wire.encode(x, codec)
    assert w.decoded.shape == x.shape and w.nbytes == split_wire.wire_bytes(tuple(shape), codec)
    if codec == "int8":  # absmax per row: |x - q s| <= s / 2, s = max|x| / 127
        step = x.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((w.decoded - x).abs() <= step / 2 + 1e-6 * scale).all())


@FAST
@given(st.text(max_size=8))
def test_split_wire_names_an_unknown_codec(codec: str) -> None:
    assume(codec not in split_wire.CODECS)
    with pytest.raises(ValueError, match="unknown codec"):
        split_wire.encode(torch.ones(2, 2), codec)
    with pytest.raises(ValueError, match="unknown codec"):
        split_wire.wire_bytes((2, 2), codec)


# --- bytes from peers: secure aggregation ---

PARAMS = SecAggParams(threshold=2, bits=8)


def protocol(tamper: typing.Callable[[str, int, bytes], bytes]) -> np.ndarray:
    """Bonawitz et al.'s four rounds between 3 real clients and a server; ``tamper(round, receiver or
    sender, message)`` may change any message on its way."""
    ids = [0, 1, 2]
    clients = {u: SecAggClient(u, PARAMS, np.random.default_rng([7, u])) for u in ids}
    server = SecAggServer(PARAMS)
    x = {u: np.full(4, 0.1 * (u + 1)) for u in ids}
    keys = tamper("key_list", -1, server.advertise([tamper("advertise", u, clients[u].advertise()) for u in ids]))
    shared = server.share_keys([tamper("shares", u, clients[u].share_keys(keys)) for u in ids])
    masked = [tamper("masked", u, clients[u].masked_input(tamper("forward", u, shared[u]), x[u])) for u in ids]
    survivors = tamper("survivors", -1, server.masked_input(masked))
    return server.unmask([tamper("unmask", u, clients[u].unmask(survivors)) for u in ids])


CLEAN: dict[tuple[str, int], bytes] = {}
protocol(lambda rnd, who, msg: CLEAN.setdefault((rnd, who), msg))
STEPS = sorted(CLEAN)


KINDS = {"advertise": 0, "key_list": 1, "shares": 2, "forward": 3, "masked": 4, "survivors": 5, "unmask": 6}


def reframed(step: tuple[str, int]) -> st.SearchStrategy[bytes]:
    """The message of ``step`` well framed but with records changed: payloads cut, grown or replaced,
    records dropped or added, ids or sender changed (what a malicious peer can send)."""
    sender, records = secagg.unpack(CLEAN[step], KINDS[step[0]])
    items = sorted(records.items())
    payload = st.one_of(st.binary(max_size=80), st.sampled_from([p for _, p in items] or [b""]).flatmap(mutated))
    edited = st.lists(st.tuples(st.integers(0, 4) | st.sampled_from([r for r, _ in items] or [0]), payload), max_size=4)
    return st.tuples(st.sampled_from([sender, 0, 1, 2, 9]), st.booleans(), edited).map(
        lambda t: secagg.pack(KINDS[step[0]], t[0], (items if t[1] else []) + t[2]))


def short_payloads(step: tuple[str, int]) -> tuple[tuple[str, int], bytes]:
    """The message of ``step`` with each record's payload one byte short, well framed."""
    sender, records = secagg.unpack(CLEAN[step], KINDS[step[0]])
    return step, secagg.pack(KINDS[step[0]], sender, [(r, p[:-1]) for r, p in records.items()])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(STEPS).flatmap(lambda step: st.tuples(
    st.just(step), mutated(CLEAN[step]) | reframed(step) | st.binary(max_size=80))))
@example(short_payloads(("key_list", -1)))  # found: a key of 31 bytes reached X25519 (ValueError)
@example(short_payloads(("masked", 0)))  # found: a masked vector of 4k - 1 bytes reached np.frombuffer (ValueError)
def test_secagg_tampered_messages_abort_with_secagg_error(case: tuple[tuple[str, int], bytes]) -> None:
    step, bad = case
    try:
        protocol(lambda rnd, who, msg: bad if (rnd, who) == step else msg)
    except SecAggError as exc:
        assert str(exc).startswith("secagg:")


@FAST
@given(st.binary(max_size=120), st.integers(0, 6))
def test_secagg_unpack_of_any_bytes(data: bytes, kind: int) -> None:
    try:
        sender, records = secagg.unpack(data, kind)
    except SecAggError:
        return
    assert secagg.pack(kind, sender, records.items()) == data


# --- request bodies: /v1/predict and the gateway's options ---

@FAST
@given(st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["inputs", "adapter", "truncate", "x"]), json_values).map(lambda d: json.dumps(d).encode()))
@example(DEEP)  # found: RecursionError, a 500 at /v1/predict
def test_predict_bodies_parse_or_raise_value_error(body: bytes) -> None:
    try:
        inputs, adapter, truncate = predict_request(body)
    except ValueError as exc:
        assert str(exc)
        return
    assert isinstance(inputs, list) and inputs and isinstance(truncate, bool)


GATEWAY = GatewayState(backend=lambda ids, n, eos: iter(()), tokenizer=None, model_id="tiny-varied", max_tokens_limit=64,
                       context_tokens=1024)


@FAST
@given(st.dictionaries(st.sampled_from(["temperature", "top_p", "n", "stream", "stop", "model", "max_tokens",
                                        "max_completion_tokens"]), json_values, max_size=4), st.integers(1, 1100))
def test_gateway_options_are_accepted_or_a_bad_request(body: dict[str, typing.Any], prompt_tokens: int) -> None:
    try:
        check_options(body, GATEWAY.model_id)
        n = max_new_tokens(body, GATEWAY, prompt_tokens)
    except BadRequest as exc:
        assert exc.status in (400, 404) and str(exc)
        return
    assert 1 <= n <= GATEWAY.max_tokens_limit and prompt_tokens + n <= 1024
