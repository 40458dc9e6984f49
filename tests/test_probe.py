"""Reliability probe 2 as a permanent suite: every bad input or fault it found, with the behaviour it must
keep (one clear line naming the problem, the right status, nothing lost). The probe ids (C config/CLI,
R resume, S module service, G gateway, F faults, T topology files) are in the test names; cases an older
test already covers are listed in docs/reliability.md with that test.

Everything runs in process: the CLI through typer's CliRunner, the service and the gateway as ASGI apps
(and as uvicorn servers in threads where a service must really die), one finished tiny run copied per
corruption."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from typer.testing import CliRunner

from edgelam.cli import app
from edgelam.config import ConfigError
from edgelam.infer.client import HttpTransport, LocalTransport, Stage
from edgelam.infer.gateway import create_gateway
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Pipeline
from edgelam.infer.service import create_app
from edgelam.infer.topology import load_topology, make_plan
from edgelam.infer.wire import CONTENT_TYPE, pack, unpack
from edgelam.models.load import load_base
from edgelam.rundir import CONFIG

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
RUN = ["fl.rounds=2", "eval.generate=0", "train.local_steps=2"]
MODEL = "tiny-varied"


def cli(*args: str):
    """``edgelam ARGS`` in this process: (exit code, stderr, stdout)."""
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stderr, res.stdout


def one_line_error(code: int, stderr: str, words: str, want: int = 2) -> None:
    assert code == want, stderr
    assert words in stderr and "Traceback" not in stderr and stderr.startswith("error:"), stderr


# --- section 1: configs and the command line ---

def alpaca(i: int) -> dict[str, str]:
    return {"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}


def data_file(tmp: Path, case: str) -> Path:
    """The data file of a C13-C18 case."""
    path = tmp / ("data.jsonl" if case in ("C16", "C17") else "data.json")
    if case == "C14":
        path.write_text("")
    elif case == "C14b":
        path.write_text("[]")
    elif case == "C15":
        path.write_text(json.dumps([{"foo": 1, "baz": 2}] * 5))
    elif case == "C16":
        lines = [json.dumps(alpaca(i)) for i in range(40)]
        lines[20] = lines[20][:30]  # line 21 cut
        path.write_text("\n".join(lines) + "\n")
    elif case == "C17":
        path.write_text("\n".join([json.dumps(alpaca(0))] + [json.dumps({"foo": "x", "bar": "y"})] * 39) + "\n")
    elif case == "C18":
        path.write_text(json.dumps([alpaca(0)]))
    return path


CONFIG_CASES = {  # id: (overrides, config file text or None for tiny.yaml, the words of the one line)
    "C1": (["fl.foo=1"], None, "unknown key 'fl.foo'; allowed keys here: strategy, rounds"),
    "C2": (["fl.rounds=abc"], None, "fl.rounds must be an integer (got 'abc')"),
    "C3": (["train.lr=-1"], None, "train.lr must be > 0"),
    "C4": (["fl.fraction=2"], None, "fl.fraction must be in (0, 1]"),
    "C5": (["model.lora.r=0"], None, "model.lora.r must be >= 1"),
    "C6": ([], "missing", "not found; `edgelam ls` lists the shipped configs"),
    "C7": ([], "fl: [1, 2\n", "is not valid YAML"),
    "C10": ([], "- a\n- b\n", "must hold a mapping of settings at the top level"),
    "C10b": ([], "42\n", "must hold a mapping of settings at the top level"),
    "C11": (["fl.strategy=fedfoo"], None, "fl.strategy must be one of"),
    "C13": (["data.source=files", "data.files=[no/such/file.json]"], None, "data path 'no/such/file.json' not found"),
    "C14": (["data.source=files"], "file", ": no records"),
    "C14b": (["data.source=files"], "file", ": no records"),
    "C15": (["data.source=files"], "file", "cannot tell the format from keys ['baz', 'foo']"),
    "C16": (["data.source=files"], "file", "line 21: not valid JSON"),
    "C17": (["data.source=files"], "file", "line 2: keys ['bar', 'foo'] do not fit format 'alpaca'"),
    "C18": (["data.source=files", "data.partition=iid", "data.num_clients=10"], "file",
            "client 1 received no examples; use fewer clients or another partition"),
    "C19": (["data.examples_per_task=1", "data.tasks=[arithmetic]", "data.num_clients=10"], None,
            "data.partition 'dirichlet' over 10 clients"),
    "C25": (["train.lr=nan"], None, "train.lr must be > 0"),
    "C25b": (["fl.rounds=true"], None, "fl.rounds must be an integer"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_C_bad_config_is_one_line_and_leaves_no_folder(tmp_path: Path, case: str) -> None:
    overrides, text, words = CONFIG_CASES[case]
    config = TINY
    if text == "missing":
        config = str(tmp_path / "nope.yaml")
    elif text == "file":
        overrides = [*overrides, f"data.files=[{data_file(tmp_path, case)}]"]
    elif text is not None:
        (tmp_path / "c.yaml").write_text(text)
        config = str(tmp_path / "c.yaml")
    out = tmp_path / "out"
    one_line_error(*cli("run", config, *RUN, *overrides, "--out", str(out))[:2], words)
    assert not out.exists()  # a run that never started leaves no half-made folder to block the next try


def test_C12_unknown_model_offline_is_one_line_and_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as CI runs; online it asks the Hub
    out = tmp_path / "out"
    one_line_error(*cli("run", TINY, "model.name=nosuchmodel-xyz", "--out", str(out))[:2],
                   "could not load model 'nosuchmodel-xyz' as a Hugging Face id or local folder")
    assert not out.exists()
    out.mkdir()  # an empty folder given by the user stays, empty
    assert cli("run", TINY, "model.name=nosuchmodel-xyz", "--out", str(out))[0] == 2
    assert out.is_dir() and not any(out.iterdir())


# --- section 2: resume after corruption (one finished run, a copy per case) ---

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round tiny run."""
    out = tmp_path_factory.mktemp("probe") / "run"
    code, stderr, _ = cli("run", TINY, *RUN, "--out", str(out))
    assert code == 0, stderr
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_C20_out_into_another_configs_run_is_refused(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    one_line_error(*cli("run", str(REPO / "configs" / "tiny_fedbuff.yaml"), "--out", str(run))[:2],
                   f"--out {run} already holds a run; resume it with `edgelam run --resume {run}`")
    assert snapshot(run) == before


def test_R5_checkpoint_of_random_bytes_is_refused(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    (run / "state" / "checkpoint.safetensors").write_bytes(random.Random(5).randbytes(4096))
    before = snapshot(run)
    one_line_error(*cli("run", "--resume", str(run))[:2], "checkpoint.safetensors is damaged")
    assert snapshot(run) == before


DRIFT = {  # id: (old text, new text) in config.yaml
    "R6-fedadam": ("strategy: fedavg", "strategy: fedadam"),
    "R6-fedavgm": ("strategy: fedavg", "strategy: fedavgm"),
    "R6-fedbuff": ("strategy: fedavg", "strategy: fedbuff"),
    "R6-hetlora": ("strategy: fedavg", "strategy: hetlora"),
    "R6-ifca": ("strategy: fedavg", "strategy: ifca"),
    "R6-sfl_v1": ("strategy: fedavg", "strategy: sfl_v1"),  # refused sooner: the saved config is not a split run's
    "R7-fedprox": ("strategy: fedavg", "strategy: fedprox"),
    "R9-lora_r": ("r: 4", "r: 8"),
}


def test_R6_R7_R9_config_drift_on_resume_is_refused(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    saved = (run / CONFIG).read_text()
    for case, (old, new) in DRIFT.items():
        assert old in saved, case
        text = saved.replace(old, new, 1)
        if case == "R7-fedprox":
            text = text.replace("prox_mu: 0.0", "prox_mu: 0.1")
        (run / CONFIG).write_text(text)
        before = snapshot(run)
        code, stderr, _ = cli("run", "--resume", str(run))
        if case == "R6-sfl_v1":
            one_line_error(code, stderr, "eval.client_heldout is not used by split learning")
        else:
            one_line_error(code, stderr, "the config differs from the one")
            assert old.split(":")[0] in stderr, (case, stderr)
        assert snapshot(run) == before, case


def test_R10_R12_resume_a_finished_run_with_fewer_rounds_or_as_is(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    rows = (run / "metrics.jsonl").read_bytes()
    code, stderr, _ = cli("run", "--resume", str(run))  # R12
    assert code == 0, stderr
    assert (run / "metrics.jsonl").read_bytes() == rows
    (run / CONFIG).write_text((run / CONFIG).read_text().replace("rounds: 2", "rounds: 1"))  # R10
    code, stderr, _ = cli("run", "--resume", str(run))
    assert code == 0, stderr
    assert (run / "metrics.jsonl").read_bytes() == rows
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2  # it ends where the checkpoint is


def test_R11_resume_without_a_run_folder(tmp_path: Path, finished: Path) -> None:
    one_line_error(*cli("run", "--resume", str(tmp_path / "nothing"))[:2], "no config.yaml there")
    run = copy_of(finished, tmp_path)
    (run / CONFIG).unlink()
    one_line_error(*cli("run", "--resume", str(run))[:2], "no config.yaml there; is it an EdgeLAM run folder?")


def test_R13_a_second_resume_of_a_running_run_is_refused(finished: Path, tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    run = copy_of(finished, tmp_path)
    (run / "summary.json").unlink()
    before = snapshot(run)
    with open(run / CONFIG, "rb") as held:  # what the running process holds (RunFolder.lock)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(*cli("run", "--resume", str(run))[:2], "is in use by another edgelam process")
    assert snapshot(run) == before
    code, stderr, _ = cli("run", "--resume", str(run))  # once the other one is gone, it resumes
    assert code == 0, stderr


# --- section 3: the module service, in process ---

@pytest.fixture(scope="module")
def service() -> Iterator[TestClient]:
    host = ModuleHost(MODEL, ModuleSpec("blocks", 0, 2), max_request_tokens=512)
    with TestClient(create_app(host, max_body_bytes=2**20), raise_server_exceptions=False) as client:
        yield client


def post(client: TestClient, body: bytes, ctype: str | None = CONTENT_TYPE) -> httpx.Response:
    return client.post("/v1/forward", content=body, headers={"content-type": ctype} if ctype else {})


def message(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    return pack(tensors, {"session": "s", "position": 0} if meta is None else meta)


def raw_message(tensors: dict[str, torch.Tensor], edgelam: str | None) -> bytes:
    """A safetensors blob with arbitrary 'edgelam' metadata text (None: no metadata at all)."""
    return save(tensors, metadata=None if edgelam is None else {"edgelam": edgelam})


H = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
SERVICE_CASES = {  # id: (body, content type, status, words)
    "S1-text": (b"hello, service", CONTENT_TYPE, 400, "body is not a valid safetensors message"),
    "S1-random": (random.Random(1).randbytes(512), CONTENT_TYPE, 400, "body is not a valid safetensors message"),
    "S1-empty": (b"", CONTENT_TYPE, 400, "body is not a valid safetensors message"),
    "S1-header-2^60": ((2**60).to_bytes(8, "little") + b"{}", CONTENT_TYPE, 400, "not a valid safetensors message"),
    "S2-name": (message({"hiddn": H}), CONTENT_TYPE, 400, "expects a float tensor 'hidden' of shape (batch, tokens, 64)"),
    "S2-int64": (message({"hidden": torch.ones(1, 3, 64, dtype=torch.int64)}), CONTENT_TYPE, 400, "a float tensor 'hidden'"),
    "S2-bool": (message({"hidden": torch.ones(1, 3, 64, dtype=torch.bool)}), CONTENT_TYPE, 400, "a float tensor 'hidden'"),
    "S2-dim63": (message({"hidden": torch.randn(1, 3, 63)}), CONTENT_TYPE, 400, "(batch, tokens, 64)"),
    "S2-rank2": (message({"hidden": torch.randn(3, 64)}), CONTENT_TYPE, 400, "(batch, tokens, 64)"),
    "S2-batch2": (message({"hidden": torch.randn(2, 3, 64)}), CONTENT_TYPE, 400, "batch size 1"),
    "S4-no-metadata": (raw_message({"hidden": H}, None), CONTENT_TYPE, 400, "metadata 'session' (a non-empty string)"),
    "S4-not-json": (raw_message({"hidden": H}, "{session"), CONTENT_TYPE, 400, "not a valid safetensors message"),
    "S4-json-list": (raw_message({"hidden": H}, "[1, 2]"), CONTENT_TYPE, 400, "'edgelam' must be a JSON object"),
    "S4-session-123": (message({"hidden": H}, {"session": 123, "position": 0}), CONTENT_TYPE, 400, "'session' (a non-empty"),
    "S4-position-0.0": (message({"hidden": H}, {"session": "s", "position": 0.0}), CONTENT_TYPE, 400,
                        "'position' (an integer >= 0)"),
    "S4-position-true": (message({"hidden": H}, {"session": "s", "position": True}), CONTENT_TYPE, 400,
                         "'position' (an integer >= 0)"),
    "S4-adapter": (message({"hidden": H}, {"session": "s", "position": 0, "adapter": "nope"}), CONTENT_TYPE, 400,
                   "adapter 'nope' is not loaded here"),
    "S5-nan": (message({"hidden": H.clone().index_fill_(1, torch.tensor([1]), float("nan"))}), CONTENT_TYPE, 400,
               "'hidden' holds NaN or infinite values"),
    "S5-inf": (message({"hidden": H.clone().index_fill_(1, torch.tensor([2]), float("inf"))}), CONTENT_TYPE, 400,
               "'hidden' holds NaN or infinite values"),
    "S11-position-1": (message({"hidden": H}, {"session": "s", "position": -1}), CONTENT_TYPE, 400,
                       "'position' (an integer >= 0)"),
    "S12-unknown": (message({"hidden": H}, {"session": "never", "position": 5}), CONTENT_TYPE, 409,
                    "unknown here (expired or never opened); replay it from position 0"),
    "S12-10^30": (message({"hidden": H}, {"session": "s", "position": 10**30}), CONTENT_TYPE, 413,
                  "exceeds the model's context of 1024"),
    "S16-text": (message({"hidden": H}), "text/plain", 415, "content-type must be application/x-safetensors"),
    "S16-json": (b'{"hidden": []}', "application/json", 415, "content-type must be application/x-safetensors"),
    "S16-none": (message({"hidden": H}), None, 415, "content-type must be application/x-safetensors"),
}


@pytest.mark.parametrize("case", list(SERVICE_CASES))
def test_S_bad_requests_are_named_4xx(service: TestClient, case: str) -> None:
    body, ctype, status, words = SERVICE_CASES[case]
    r = post(service, body, ctype)
    assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)


def test_S3_float16_and_huge_values_are_served(service: TestClient) -> None:
    r = post(service, message({"hidden": H.half()}, {"session": "half", "position": 0}))
    assert r.status_code == 200 and unpack(r.content)[0]["hidden"].shape == (1, 3, 64)
    r = post(service, message({"hidden": torch.full((1, 2, 64), 3e38)}, {"session": "big", "position": 0}))
    assert r.status_code == 200 and bool(torch.isfinite(unpack(r.content)[0]["hidden"]).all())


def test_S11_S12_positions_out_of_step(service: TestClient) -> None:
    assert post(service, message({"hidden": H}, {"session": "three", "position": 0})).status_code == 200
    r = post(service, message({"hidden": H[:, :1]}, {"session": "three", "position": -1}))
    assert r.status_code == 400 and "'position' (an integer >= 0)" in r.json()["error"]
    r = post(service, message({"hidden": H[:, :1]}, {"session": "three", "position": 10}))
    assert r.status_code == 409 and "holds 3 tokens; position 10 would leave a gap" in r.json()["error"]


@pytest.mark.parametrize("session", ["x" * 10_000, "y" * 1_000_000, "a/b/../\u2603\0"], ids=["S13-10k", "S13-1M", "S13-odd"])
def test_S13_any_session_string_is_a_session(service: TestClient, session: str) -> None:
    assert post(service, message({"hidden": H}, {"session": session, "position": 0})).status_code == 200
    service.app.state.service.host.close(session)  # frees its cache for the next cases


def test_S14_replays_are_bit_identical(service: TestClient) -> None:
    def step(session: str, position: int, h: torch.Tensor) -> torch.Tensor:
        r = post(service, message({"hidden": h}, {"session": session, "position": position}))
        assert r.status_code == 200
        return unpack(r.content)[0]["hidden"]

    first, again = step("replay", 0, H), step("replay", 0, H)
    nxt, nxt_again = step("replay", 3, H[:, :1]), step("replay", 3, H[:, :1])
    assert torch.equal(first, again) and torch.equal(nxt, nxt_again)
    step("clean", 0, H)
    assert torch.equal(step("clean", 3, H[:, :1]), nxt)


def test_S15_S19_concurrent_sessions_equal_sequential_and_health_stays_quick(service: TestClient) -> None:
    hs = [torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def session(i: int, tag: str) -> list[torch.Tensor]:
        outs = []
        for pos, chunk in ((0, hs[i][:, :2]), (2, hs[i][:, 2:3]), (3, hs[i][:, 3:])):
            r = post(service, message({"hidden": chunk}, {"session": f"{tag}{i}", "position": pos}))
            assert r.status_code == 200
            outs.append(unpack(r.content)[0]["hidden"])
        return outs

    sequential = [session(i, "seq") for i in range(len(hs))]
    results: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, session(i, "par"))) for i in range(len(hs))]
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        for path in ("/health", "/ready", "/info"):
            assert service.get(path).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
    for t in threads:
        t.join()
    # concurrent decode steps share a forward (infer/batching.py): equal to float tolerance, not bit for bit
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for i in range(len(hs)) for a, b in zip(results[i], sequential[i]))
    assert slowest < 2.0


# --- section 3: `edgelam serve` flags (in process; nothing starts serving) ---

@pytest.mark.parametrize("args, want, words", [
    (["--module", "blocks:0:99"], 2, "blocks:0:99 exceeds the model's 4 blocks"),
    (["--module", "blocks:0:2", "--wire-dtype", "int8"], 2, "--wire-dtype must be float32 or float16, got 'int8'"),
    (["--module", "blocks:0:2", "--adapter", "x=missing"], 2, "missing is not a PEFT adapter folder"),
    (["--module", "blocks:0:2", "--threads", "0"], 2, "--threads must be >= 1, got 0"),
    (["--module", "blocks:0:2", "--cpus", "4096"], 2, "--cpus: cpus [4096] name cores this process cannot use"),
    (["--module", "blocks:0:2", "--max-batch", "0"], 2, "--max-batch must be >= 1, got 0"),
    (["--module", "full", "--quantize", "int4"], 2, "--quantize must be int8 (or left out), got 'int4'"),
    (["--module", "blocks:0:2", "--push-to", "ftp://x"], 2, "--push-to takes service URLs"),
], ids=["S23-range", "S23-wire-dtype", "S23-adapter", "S23-threads", "S23-cpus", "S23-max-batch", "S23-quantize",
        "S23-push-to"])
def test_S23_serve_flags_are_checked(monkeypatch, args: list[str], want: int, words: str) -> None:
    monkeypatch.delenv("EDGELAM_PARENT_PID", raising=False)
    code, stderr, _ = cli("serve", "--model", MODEL, *args)
    one_line_error(code, stderr, words, want)


def test_S23_serve_on_a_port_in_use_exits_3() -> None:
    # its own process: uvicorn configures logging on the process's stderr, which must not be CliRunner's
    env = {k: v for k, v in os.environ.items() if k != "EDGELAM_PARENT_PID"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "edgelam.cli", "serve", "--model", MODEL, "--module", "blocks:0:2",
                               "--port", str(taken.getsockname()[1])], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr  # "address already in use"


# --- section 4: the gateway, in process, on a real (local) pipeline ---

def local_pipeline() -> Pipeline:
    def stage(spec: ModuleSpec) -> Stage:
        return Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec), str(spec))])

    return Pipeline(stage(ModuleSpec("embed")), [stage(ModuleSpec("blocks", 0, 4))], stage(ModuleSpec("head")))


@pytest.fixture(scope="module")
def gateway() -> TestClient:
    pipe, tok = local_pipeline(), load_base(MODEL, "float32", 0).tokenizer
    return TestClient(create_gateway(pipe.stream, tok, MODEL, 8, 64, 1024), raise_server_exceptions=False)


HI = [{"role": "user", "content": "Hi"}]
GATEWAY_CASES = {  # id: (path, raw body or JSON, words)
    "G1-malformed": ("chat", b"{not json", "the body must be JSON"),
    "G1-non-utf8": ("chat", b"\xff\xfe{}", "the body must be JSON"),
    "G1-empty": ("chat", b"", "the body must be JSON"),
    "G1-array": ("chat", b"[]", "the body must be a JSON object"),
    "G2-no-messages": ("chat", {}, "messages must be a non-empty list of {role: system|user|assistant, content: string}"),
    "G2-no-prompt": ("completions", {}, "prompt must be a non-empty string"),
    "G2-empty-list": ("chat", {"messages": []}, "messages must be a non-empty list"),
    "G2-no-role": ("chat", {"messages": [{"content": "hi"}]}, "messages must be a non-empty list"),
    "G2-role-tool": ("chat", {"messages": [{"role": "tool", "content": "hi"}]}, "messages must be a non-empty list"),
    "G2-string": ("chat", {"messages": "hi"}, "messages must be a non-empty list"),
    "G2-content-list": ("chat", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages must be a non-empty list"),
    "G3-max_tokens-str": ("chat", {"messages": HI, "max_tokens": "8"}, "max_tokens must be a positive integer"),
    "G3-max_tokens-0": ("chat", {"messages": HI, "max_tokens": 0}, "max_tokens must be a positive integer"),
    "G3-max_tokens-neg": ("chat", {"messages": HI, "max_tokens": -5}, "max_tokens must be a positive integer"),
    "G3-max_tokens-float": ("chat", {"messages": HI, "max_tokens": 8.0}, "max_tokens must be a positive integer"),
    "G3-n-str": ("chat", {"messages": HI, "n": "1"}, "n must be 1"),
    "G3-top_p": ("chat", {"messages": HI, "top_p": 0}, "top_p must be a number in (0, 1]"),
    "G3-temperature": ("chat", {"messages": HI, "temperature": 2.5}, "temperature must be a number between 0 and 2"),
}


@pytest.mark.parametrize("case", list(GATEWAY_CASES))
def test_G_bad_requests_are_400_with_an_openai_error(gateway: TestClient, case: str) -> None:
    path, body, words = GATEWAY_CASES[case]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = gateway.post(f"/v1/{path}/completions" if path == "chat" else "/v1/completions", **kw)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def stream_text(lines: list[str]) -> str:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def test_G11_G12_concurrent_requests_and_streams_answer_as_sequential(gateway: TestClient) -> None:
    asks = [[{"role": "user", "content": f"Count to {i}."}] for i in range(4)]
    want = [gateway.post("/v1/chat/completions", json={"messages": m}).json()["choices"][0]["message"]["content"]
            for m in asks]

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            plain = [c.post("/v1/chat/completions", json={"messages": m}) for m in asks]
            streams = [c.post("/v1/chat/completions", json={"messages": m, "stream": True}) for m in asks]
            got = await asyncio.gather(*plain, *streams)
        return list(got[:4]), list(got[4:])

    plain, streams = asyncio.run(both())
    assert [r.json()["choices"][0]["message"]["content"] for r in plain] == want
    assert [stream_text(r.text.splitlines()) for r in streams] == want
    assert len(set(want)) > 1  # the answers differ, so equality means something


def test_G14_a_client_gone_mid_request_frees_the_gateway(gateway: TestClient) -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            gone = asyncio.create_task(c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 64}))
            await asyncio.sleep(0.05)
            gone.cancel()  # the client went away mid-generation
            with pytest.raises(asyncio.CancelledError):
                await gone
            return await asyncio.wait_for(c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}), 30)

    r = asyncio.run(go())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# --- section 5: faults; services as real uvicorn servers in threads that really stop ---

class ThreadService:
    """A module service on a real socket, served by uvicorn in a thread; ``kill`` stops it (connections
    refused from then on)."""

    def __init__(self, spec: ModuleSpec) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.module = f"blocks:{spec.start}:{spec.end}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(ModuleHost(MODEL, spec)), log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the service did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        self.server.should_exit = self.server.force_exit = True
        self.thread.join(10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


def test_F3_F5_F6_replicas_fail_over_then_the_last_dead_stage_is_named() -> None:
    """F3: the primary of each range dies mid-stream, the answer is unchanged; F5: the last service of
    blocks 2..3 dies during a non-streaming request: 503 naming it, and for later requests; F6: /health."""
    groups = {(0, 2): [], (2, 4): []}  # type: dict[tuple[int, int], list[ThreadService]]
    try:
        for (a, b), svcs in groups.items():
            svcs += [ThreadService(ModuleSpec("blocks", a, b)) for _ in range(2)]
        local = lambda spec: Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec))])  # noqa: E731
        blocks = [Stage(f"blocks {a}..{b - 1}", [HttpTransport(s.url, f"{s.module}#{i}") for i, s in enumerate(svcs)])
                  for (a, b), svcs in groups.items()]
        pipe = Pipeline(local(ModuleSpec("embed")), blocks, local(ModuleSpec("head")))
        kill_at: dict[int, ThreadService] = {}

        def backend(ids: list[int], n: int, eos: int | None) -> Iterator[int]:
            for i, tok in enumerate(pipe.stream(ids, n, eos)):
                yield tok
                if i in kill_at:
                    kill_at.pop(i).kill()

        def dead() -> list[str]:
            return sorted(svcs[0].module for svcs in groups.values() if not any(s.alive for s in svcs))

        tok = load_base(MODEL, "float32", 0).tokenizer
        client = TestClient(create_gateway(backend, tok, MODEL, 12, 64, 1024, dead), raise_server_exceptions=False)
        ask = {"messages": HI, "max_tokens": 12}
        want = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
        kill_at.update({2: groups[(2, 4)][0], 5: groups[(0, 2)][0]})
        with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r:
            assert stream_text(list(r.iter_lines())) == want  # F3
        assert client.get("/health").json() == {"status": "ok"}
        kill_at[3] = groups[(2, 4)][1]
        for _ in range(2):  # F5: the request it died in, then a later one
            r = client.post("/v1/chat/completions", json=ask)
            assert r.status_code == 503 and "no service left for blocks 2..3" in r.json()["error"]["message"], r.text
        health = client.get("/health")  # F6
        assert health.status_code == 503 and health.json() == {"status": "degraded", "dead": ["blocks:2:4"]}
    finally:
        for svcs in groups.values():
            for s in svcs:
                s.kill()


# --- the other hand-made topologies ---

def test_T6_T7_unknown_mode_and_a_placement_gap_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "topo.yaml"
    path.write_text("mode: telepathy\nnodes: [{name: e, flops_per_s: 1.0e11}]\n")
    with pytest.raises(ConfigError, match=r"mode .telepathy. must be one of \[.escalation.,"):
        load_topology(path)
    path.write_text("nodes: [{name: e1, flops_per_s: 1.0e11}, {name: e2, flops_per_s: 1.0e11}]\n"
                    "placement: {e1: [0, 1], e2: [2, 4]}\n")
    with pytest.raises(ConfigError, match=r"must name known nodes and cover blocks 0..3 in contiguous ranges"):
        make_plan(load_topology(path), load_base(MODEL, "float32", 0).model.config)  # before any service starts


def test_T8_missing_topology_file(tmp_path: Path) -> None:
    code, stderr, _ = cli("infer", "--topology", str(tmp_path / "none.yaml"), "--prompt", "hi")
    one_line_error(code, stderr, "none.yaml")
