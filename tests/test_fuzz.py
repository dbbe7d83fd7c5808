"""Bad input against the running app: schemathesis over the OpenAPI schema the API
publishes, hostile bodies, malformed gRPC messages. Nothing may get a 5xx, a response
must match the schema, and a stream running meanwhile must finish unharmed.

A tiny random model (every step is cheap, so hundreds of generated requests run fast).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import free_port, serving
from tests.serve_helpers import Stream

MODEL = "tiny"
CASES: dict[str, int] = {}  # generated requests sent, per operation


@pytest.fixture(scope="module")
def app(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> Iterator[tuple[str, str]]:
    grpc_port = free_port()
    with serving(model=str(tiny_dirs["llama3"]), model_name=MODEL, grpc_port=grpc_port,
                 engine={"max_model_len": 256}) as cfg:  # fmt: skip
        yield f"http://127.0.0.1:{cfg.http_port}", f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def canary(app: tuple[str, str]) -> Iterator[Stream]:
    """A long stream that runs while the module's bad input arrives."""
    s = Stream(app[0], [7, 8, 9], MODEL, 200)
    s.start()
    yield s
    s.join(120)
    assert s.error is None and s.done and s.usage["completion_tokens"] == 200, s.error


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    app: tuple[str, str], canary: Stream, mode: str
) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    base = app[0]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]  # fmt: skip
    if mode == "negative":
        checks.append(negative_data_rejection)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /health",
    }
    with httpx.Client(timeout=120) as client:
        for op in ops:
            _fuzz(client, base, op, mode, checks)
    assert canary.error is None


def _fuzz(client: httpx.Client, base: str, op: Any, mode: str, checks: list[Any]) -> None:
    """Hypothesis over one operation: each generated case sent, its response checked."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    key = f"{mode} {op.method.upper()} {op.path}"
    # Operations with a body or path parameters get the most cases; the rest need few.
    has_body = bool(op.get_request_payload_content_types())
    many = has_body or "{" in op.path

    @settings(max_examples=150 if many else 5, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Any) -> None:
        kw = case.as_transport_kwargs(base_url=base)
        resp = client.request(kw.pop("method"), kw.pop("url"), **_httpx_kwargs(kw))
        CASES[key] = CASES.get(key, 0) + 1
        case.validate_response(resp, checks=checks)

    from hypothesis.errors import Unsatisfiable

    try:
        run()
    except Unsatisfiable:  # negative mode, an operation with nothing to make invalid
        assert mode == "negative" and (op.method.upper() != "POST" or not has_body), key


def _httpx_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Schemathesis' transport kwargs (requests-style) as httpx takes them."""
    out: dict[str, Any] = {k: kw[k] for k in ("headers", "params", "cookies") if kw.get(k)}
    if "json" in kw:
        out["json"] = kw["json"]
    elif kw.get("data") is not None:
        out["content"] = kw["data"]
    return out


def test_at_least_500_generated_requests() -> None:
    assert sum(CASES.values()) >= 500, CASES
    print("\nschemathesis cases:", sum(CASES.values()), CASES)


def _post(base: str, content: bytes | str, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{base}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json"})  # fmt: skip


def test_hostile_bodies_get_clear_4xx(app: tuple[str, str], canary: Stream) -> None:
    base = app[0]
    body = {"model": MODEL, "prompt": "w7 w8", "max_tokens": 4}
    cases: list[tuple[str, bytes | str, set[int]]] = [
        ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe\xfd", "max_tokens": 4}', {400}),
        ("not JSON", b"{model: tiny", {400}),
        ("a JSON list", b"[1, 2, 3]", {400}),
        ("empty body", b"", {400}),
        ("deeply nested JSON", '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000
         + "}", {400}),
        ("nested prompt", json.dumps(body | {"prompt": [[[[1]]]]}), {400}),
        ("NaN temperature", '{"model": "tiny", "prompt": "w7", "temperature": NaN}', {400}),
        ("max_tokens 10^40 (cut to the room left)", json.dumps(body | {"max_tokens": 10**40}),
         {200}),
        ("5 MB body", json.dumps(body | {"prompt": "w7 " * (5 * 1024 * 1024 // 3)}), {413}),
        ("1 MB prompt over the context", json.dumps(body | {"prompt": "w7 " * 350_000}), {400}),
        ("control characters", json.dumps(body | {"prompt": "w7\x00\x01\x1b[31m\u202e w8"}),
         {200}),
        ("max_tokens 10^9 (cut to the room left)", json.dumps(body | {"max_tokens": 10**9}), {200}),
        ("negative max_tokens", json.dumps(body | {"max_tokens": -1}), {400}),
        ("token id outside the vocabulary", json.dumps(body | {"prompt": [10**9]}), {400}),
        ("unknown model", json.dumps(body | {"model": "gpt-17"}), {404}),
        ("stop list of 1000", json.dumps(body | {"stop": ["x"] * 1000}), {400}),
        ("n of 10^6", json.dumps(body | {"n": 10**6}), {400}),
    ]  # fmt: skip
    for what, content, want in cases:
        r = _post(base, content)
        assert r.status_code in want, (what, r.status_code, r.text[:300])
        if r.status_code != 200:
            err = r.json().get("error") if r.headers.get("content-type", "").startswith(
                "application/json") else None  # fmt: skip
            assert err and err["message"] and err["type"], (what, r.status_code, r.text[:300])
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop"), what
    r = _post(base, json.dumps(body | {"max_tokens": 10**9}))
    assert r.json()["usage"]["completion_tokens"] > 4  # it ran to the end of the context
    assert canary.error is None


def test_malformed_grpc_messages_get_invalid_argument(app: tuple[str, str]) -> None:
    import grpc

    from protos import kvserve_pb2 as pb
    from protos import kvserve_pb2_grpc

    with grpc.insecure_channel(app[1]) as channel:
        raw = channel.unary_unary("/kvserve.v1.KVServe/Generate",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)  # fmt: skip
        for junk in (b"\xff\xff\xff\xff", b"\x12\x05ab", b"\x0a\xff\xff\xff\xff\x0f"):
            with pytest.raises(grpc.RpcError) as info:
                raw(junk, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert info.value.details()
        stub = kvserve_pb2_grpc.KVServeStub(channel)
        bad = [
            pb.SamplingOptions(max_tokens=0),
            pb.SamplingOptions(top_p=1.5),
            pb.SamplingOptions(n=10**6),
            pb.SamplingOptions(logprobs=10**6),
            pb.SamplingOptions(presence_penalty=float("nan")),
            pb.SamplingOptions(repetition_penalty=-1),
        ]
        for opts in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(text="w7 w8", sampling=opts), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, opts
            assert info.value.details(), opts
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(text="w7 " * 400), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = stub.Generate(pb.GenerateRequest(
            text="w7 w8", sampling=pb.SamplingOptions(max_tokens=4, temperature=0)), timeout=30)  # fmt: skip
        assert ok.finished and ok.usage.completion_tokens == 4


def test_concurrent_garbage_does_not_disturb_streams(app: tuple[str, str]) -> None:
    base = app[0]
    streams = [Stream(base, [7, 8, 9 + i], MODEL, 100) for i in range(4)]
    for s in streams:
        s.start()

    def garbage() -> None:
        for i in range(50):
            _post(base, b"{" * (i + 1))
            _post(base, json.dumps({"model": MODEL, "prompt": [10**9]}))

    threads = [threading.Thread(target=garbage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in streams:
        s.join(120)
        assert s.error is None and s.done and s.usage["completion_tokens"] == 100
