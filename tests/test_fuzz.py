"""API fuzzing of every HTTP app, in process: Schemathesis drives each route from the app's own OpenAPI
schema (valid and invalid requests), Hypothesis sends raw bytes, and a flood meets the concurrency limit.
Whatever comes in: never a 5xx, and every rejection is one JSON error body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from edgelam.infer.client import LocalTransport, Stage
from edgelam.infer.gateway import create_gateway
from edgelam.infer.modules import ModuleHost, ModuleSpec
from edgelam.infer.pipeline import Pipeline
from edgelam.infer.service import create_app
from edgelam.infer.wire import CONTENT_TYPE, pack
from edgelam.models.load import load_base

MODEL = "tiny-varied"
schemathesis.serializer.alias(CONTENT_TYPE, "application/octet-stream")  # the fuzzer sends raw bytes as the body
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def service_app(max_concurrent: int = 256) -> FastAPI:
    host = ModuleHost(MODEL, ModuleSpec("blocks", 0, 2), max_request_tokens=64)
    return create_app(host, max_body_bytes=2**16, max_concurrent=max_concurrent)


def gateway_app(max_concurrent: int = 64) -> FastAPI:
    def stage(spec: ModuleSpec) -> Stage:
        return Stage(str(spec), [LocalTransport(ModuleHost(MODEL, spec), str(spec))])

    pipe = Pipeline(stage(ModuleSpec("embed")), [stage(ModuleSpec("blocks", 0, 4))], stage(ModuleSpec("head")))
    # answers of at most 4 tokens keep each example quick
    return create_gateway(pipe.stream, load_base(MODEL, "float32", 0).tokenizer, MODEL, 4, 4, 1024,
                          max_concurrent=max_concurrent)


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    predictor = create_app(ModuleHost(MODEL, ModuleSpec("full"), max_request_tokens=64), max_body_bytes=2**16)
    return {"service": schemathesis.openapi.from_asgi("/openapi.json", service_app()),
            "predictor": schemathesis.openapi.from_asgi("/openapi.json", predictor),
            "gateway": schemathesis.openapi.from_asgi("/openapi.json", gateway_app())}


def one_json_error(response: httpx.Response | Any) -> None:
    """A rejection is one JSON object with an 'error' (a message, or OpenAI's {message, type, code})."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, str) or isinstance(error, dict) and isinstance(error.get("message"), str), response.content


def json_error_body(ctx: Any, response: Any, case: Any) -> bool:
    one_json_error(response)
    return True


CHECKS = [not_a_server_error, json_error_body]


@pytest.mark.parametrize("which", ["service", "predictor", "gateway"])
def test_api_from_its_schema_is_never_5xx(schemas: dict[str, Any], which: str) -> None:
    """Every operation, with requests that fit its schema and requests that break it (Schemathesis'
    positive and negative modes); Schemathesis' pytest plugin is not used (its lazy loader does not
    run on pytest 9), so each operation's strategy runs under a plain Hypothesis test."""
    schema = schemas[which]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 2
    for op in operations:
        # a JSON body can break its schema; a path, a binary body or no input at all cannot
        content = schema.raw_schema["paths"][op.path][op.method].get("requestBody", {}).get("content", {})
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if "application/json" in content else []):
            @FUZZ
            @given(op.as_strategy(mode))
            def run(case: Any) -> None:
                case.call_and_validate(checks=CHECKS)

            run()


def test_schemas_describe_the_bodies(schemas: dict[str, Any]) -> None:
    """The fuzzer sends bodies only if the schema has them (the handlers read raw bodies)."""
    service_schema, gateway_schema = schemas["service"], schemas["gateway"]
    forward = service_schema.raw_schema["paths"]["/v1/forward"]["post"]["requestBody"]["content"]
    assert forward[CONTENT_TYPE]["schema"]["format"] == "binary"
    chat = gateway_schema.raw_schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["required"] and "503" in chat["responses"]


# --- raw bytes and mutated messages (Hypothesis) ---

@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, TestClient]]:
    with TestClient(service_app(), raise_server_exceptions=False) as svc, \
            TestClient(gateway_app(), raise_server_exceptions=False) as gw:
        yield {"service": svc, "gateway": gw}


VALID = pack({"hidden": torch.randn(1, 2, 64)}, {"session": "fuzz", "position": 0})


def mutations(blob: bytes) -> st.SearchStrategy[bytes]:
    return (st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), min_size=1, max_size=3).map(
        lambda flips: bytes(b ^ dict(flips).get(i, 0) for i, b in enumerate(blob)))
        | st.integers(0, len(blob) - 1).map(lambda n: blob[:n]))


ROUTES = [("service", "/v1/forward", CONTENT_TYPE), ("service", "/v1/predict", "application/json"),
          ("gateway", "/v1/chat/completions", "application/json"), ("gateway", "/v1/completions", "application/json")]


@pytest.mark.parametrize("app, path, ctype", ROUTES, ids=[p for _, p, _ in ROUTES])
def test_raw_bytes_are_never_a_5xx(clients: dict[str, TestClient], app: str, path: str, ctype: str) -> None:
    client = clients[app]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | mutations(VALID), st.sampled_from([ctype, "text/plain"]))
    @example(b"[" * 100_000, ctype)  # found: JSON nested past the recursion limit was a 500 (RecursionError)
    def check(body: bytes, content_type: str) -> None:
        r = client.post(path, content=body, headers={"content-type": content_type})
        assert r.status_code < 500, r.text
        one_json_error(r)

    check()


# --- request floods ---

async def flood(app: FastAPI, path: str, bodies: list[dict[str, Any]]) -> tuple[list[httpx.Response], list[int]]:
    """Every request at once, and /health polled meanwhile."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as c:
        async def health() -> list[int]:
            codes = []
            for _ in range(5):
                codes.append((await c.get("/health")).status_code)
                await asyncio.sleep(0)
            return codes

        *answers, codes = await asyncio.gather(*(c.post(path, **b) for b in bodies), health())
    return answers, codes


@pytest.mark.parametrize("which", ["gateway", "service"])
def test_a_flood_is_bounded_and_every_accepted_request_answered(which: str) -> None:
    if which == "gateway":
        app, path, flag = gateway_app(max_concurrent=3), "/v1/chat/completions", "edgelam gateway --max-concurrent"
        bodies = [{"json": {"messages": [{"role": "user", "content": f"Count to {i}."}]}} for i in range(12)]
    else:
        app, path, flag = service_app(max_concurrent=3), "/v1/forward", "edgelam serve --max-concurrent"
        bodies = [{"content": pack({"hidden": torch.randn(1, 60, 64)}, {"session": f"f{i}", "position": 0}),
                   "headers": {"content-type": CONTENT_TYPE}} for i in range(12)]
    answers, health = asyncio.run(flood(app, path, bodies))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(ok) >= 3 and refused and health == [200] * 5
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        one_json_error(r)
        error = r.json()["error"]
        assert f"the limit of this server ({flag} 3)" in (error["message"] if which == "gateway" else error)
    if which == "gateway":
        assert all(r.json()["choices"][0]["message"]["content"] is not None for r in ok)
    # the flood is over: the full capacity is back
    again, _ = asyncio.run(flood(app, path, bodies[:3]))
    assert [r.status_code for r in again] == [200, 200, 200]
