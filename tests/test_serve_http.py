"""The Serve application on a real local Ray, through HTTP on loopback: the official
``openai`` client (sync and streaming), raw HTTP for bad input, cancellation."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import LLM, SamplingParams
from tests.factories import free_port, serving

MODEL = "SmolLM2-135M-Instruct"
LONG_PROMPT = (
    "Kvserve keeps the keys and values of every token in fixed-size blocks, shares them "
    "between requests with a common prefix, and moves them between GPUs only when that "
    "pays. Summarise this in one sentence:"
)


@pytest.fixture(scope="module")
def app(ray_cluster: Any, smollm2_dir: Path) -> Any:
    """The application's ServeConfig, once /health answers. Its engine runs with async
    scheduling (on by default only with CUDA), so every test here also shows the served
    path giving the synchronous offline engine's outputs with it."""
    engine = {"max_model_len": 1024, "cpu_kv_cache_bytes": 256 * 1024**2, "async_scheduling": True}
    with serving(model=str(smollm2_dir), model_name=MODEL, grpc_port=free_port(),
                 engine=engine) as cfg:  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{cfg.http_port}/health", timeout=5).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield cfg


@pytest.fixture(scope="module")
def server(app: Any) -> str:
    return f"http://127.0.0.1:{app.http_port}"


@pytest.fixture(scope="module")
def grpc_target(app: Any) -> str:
    return f"127.0.0.1:{app.grpc_port}"


@pytest.fixture(scope="module")
def grpc_stub(grpc_target: str) -> Any:
    import grpc

    from protos import kvserve_pb2_grpc

    channel = grpc.insecure_channel(grpc_target)
    yield kvserve_pb2_grpc.KVServeStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _engine_stats() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("engine", app_name="kvserve")
    return dict(handle.stats.remote().result())


def _pool_whole(timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = _engine_stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["num_blocks"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"pool not whole: {s}")
        time.sleep(0.2)


def test_models(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_offline_engine(client: Any, smollm2_llm: LLM) -> None:
    prompt = "The capital of France is"
    ref = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == ref.outputs[0].text
    assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_and_streaming_agree(client: Any, smollm2_llm: LLM) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    ref = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32,
                                         temperature=0)  # fmt: skip
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)
    stream = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16,
                                       temperature=0, stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].text for c in stream)
    whole = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16,
                                      temperature=0)  # fmt: skip
    assert streamed == whole.choices[0].text


def test_n_seed_stop_and_logprobs(client: Any) -> None:
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert (
        a.usage.completion_tokens == sum(1 for _ in range(2)) * 16
        or a.usage.completion_tokens <= 32
    )
    greedy = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0
    )
    cut = greedy.choices[0].text.strip().split(",")[2].strip()
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24,
                                        temperature=0, stop=[cut])  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert cut not in stopped.choices[0].text
    lp = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2
    )
    tokens = lp.choices[0].logprobs.tokens
    assert len(tokens) == lp.usage.completion_tokens == 5
    assert all(len(t) >= 1 for t in lp.choices[0].logprobs.top_logprobs)
    assert "".join(tokens) == lp.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)


def test_prefix_cache_hit_in_usage(client: Any) -> None:
    first = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens >= 32
    assert cached > 0 and cached % 16 == 0 and cached < again.usage.prompt_tokens


def test_reset_prefix_cache_forgets_prefixes_and_not_the_text(
    client: Any, server: str, grpc_stub: Any
) -> None:
    """A repeated prompt reports cached tokens; after ``POST /reset_prefix_cache`` it
    reports none, then some again; the greedy text is the same every time. The gRPC
    call and ``kvserve cache reset`` do the same."""
    from cluster.cli import main as cli
    from protos import kvserve_pb2

    kw = dict(model=MODEL, prompt=LONG_PROMPT + " Reset:", max_tokens=12, temperature=0)

    def run() -> tuple[str, int]:
        out = client.completions.create(**kw)
        return out.choices[0].text, out.usage.prompt_tokens_details.cached_tokens

    first = run()
    hit = run()
    assert hit[1] > 0 and hit[0] == first[0]
    r = httpx.post(f"{server}/reset_prefix_cache", timeout=60)
    assert r.status_code == 200, r.text
    (forgotten,) = r.json()["instances"].values()
    assert forgotten > 0
    after = run()
    assert after == (first[0], 0)
    assert run() == hit  # the prefix is back
    resp = grpc_stub.ResetPrefixCache(kvserve_pb2.ResetPrefixCacheRequest(), timeout=60)
    assert sum(resp.forgotten_blocks.values()) > 0 and not resp.errors
    assert run() == (first[0], 0)
    assert cli(["cache", "reset", "--url", server]) == 0
    assert run() == (first[0], 0)
    _pool_whole()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ("{not json", 400, None),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
        ({"model": MODEL, "prompt": ""}, 400, None),
        ({"model": MODEL, "prompt": "word " * 1500}, 400, "prompt"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ({"model": "gpt-17", "prompt": "hi"}, 404, "model"),
        ({"prompt": "hi"}, 400, "model"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    server: str, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param


def test_bad_chat_requests(server: str) -> None:
    for body in ({"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}):  # fmt: skip
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]


def test_bad_input_does_not_disturb_a_stream(client: Any, server: str, smollm2_llm: LLM) -> None:
    ref = smollm2_llm.generate(
        ["A haiku about rivers:"], SamplingParams(temperature=0, max_tokens=48)
    )
    pieces: list[str] = []

    def consume() -> None:
        for c in client.completions.create(model=MODEL, prompt="A haiku about rivers:",
                                           max_tokens=48, temperature=0, stream=True):  # fmt: skip
            pieces.append(c.choices[0].text)

    t = threading.Thread(target=consume)
    t.start()
    for _ in range(5):
        r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 0},
                       timeout=60)  # fmt: skip
        assert r.status_code == 400
    t.join(timeout=120)
    assert "".join(pieces) == ref[0].outputs[0].text


def test_api_processes_share_one_engine(app: Any, server: str, smollm2_llm: LLM) -> None:
    """Concurrent requests are answered by both API replicas (the ``kvserve.api`` of
    each response), all from the one engine instance, each equal to the offline
    engine's greedy text."""
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    refs = smollm2_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    got: list[dict[str, Any]] = [{} for _ in prompts]

    def one(i: int) -> None:
        r = httpx.post(f"{server}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompts[i], "max_tokens": 24, "temperature": 0})  # fmt: skip
        r.raise_for_status()
        got[i] = r.json()

    apis: set[str] = set()
    for _ in range(3):  # Serve's proxy spreads concurrent calls; a batch may miss one
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [g["choices"][0]["text"] for g in got] == [r.outputs[0].text for r in refs]
        assert len({g["kvserve"]["instance"] for g in got}) == 1
        apis |= {g["kvserve"]["api"] for g in got}
        if len(apis) == app.api_replicas:
            break
    assert len(apis) == app.api_replicas == 2, apis
    _pool_whole()


def test_the_running_api_processes_never_load_torch(app: Any, server: str) -> None:
    """After serving HTTP and gRPC, no API replica's process has torch (or its library)
    loaded, and the engine replica's has (the check can see it)."""
    import psutil

    httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # fmt: skip

    def torch_mapped(pid: int) -> bool:
        return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())

    def replicas(deployment: str) -> list[int]:  # Ray titles a replica's process by its name
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if f"ServeReplica:kvserve:{deployment}" in " ".join(p.info["cmdline"] or ())]  # fmt: skip

    api, engine = replicas("api"), replicas("engine")
    assert len(api) == app.api_replicas and engine, (api, engine)
    assert not any(torch_mapped(pid) for pid in api)
    assert all(torch_mapped(pid) for pid in engine)


def test_cancel_mid_stream_returns_blocks(server: str) -> None:
    body = {"model": MODEL, "prompt": LONG_PROMPT + " And again:", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 3:
                break  # leave: the connection closes
    assert _engine_stats()["num_blocks"] > 0
    _pool_whole()


def test_health(server: str) -> None:
    r = httpx.get(f"{server}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_status_and_metrics(server: str, client: Any, ray_cluster: Any) -> None:
    """The ledger lists the instance (``kvserve status``) and the custom metrics reach
    Prometheus text at the node's metrics export port."""
    import subprocess
    import sys

    from cluster.placement.ledger import get_ledger

    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        rows = ray_cluster.get(get_ledger().instances.remote())
        time.sleep(0.5)
    assert rows and rows[0]["model"] == MODEL and rows[0]["num_blocks"] > 0
    # The block ledger agrees with the instances' own counts once they have reported.
    own = _engine_stats()
    deadline = time.monotonic() + 20
    while True:
        totals = ray_cluster.get(get_ledger().totals.remote())
        rows = ray_cluster.get(get_ledger().instances.remote())
        mine = [r for r in rows if r["model"] == MODEL]
        used = sum(r["num_blocks"] - r["free_blocks"] for r in rows)
        if (mine and mine[0]["free_blocks"] == own["free_blocks"] and totals["used"] == used) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert totals["capacity"] == sum(r["num_blocks"] for r in rows)
    assert totals["used"] == used and totals["reserved"] == 0
    assert (
        mine[0]["num_blocks"] == own["num_blocks"] and mine[0]["free_blocks"] == own["free_blocks"]
    )
    address = ray_cluster.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", address],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "kvserve instances (" in out.stdout and MODEL[:10] in out.stdout
    node = ray_cluster._private.worker.global_worker.node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    wanted = ["ray_kvserve_time_to_first_token_seconds_bucket", "ray_kvserve_generation_tokens",
              "ray_kvserve_num_requests_running", "ray_kvserve_kv_cache_usage_perc",
              "ray_kvserve_prefix_cache_queries", "ray_kvserve_e2e_request_latency_seconds",
              "ray_kvserve_inter_token_latency_seconds",
              "ray_kvserve_api_event_loop_lag_seconds", "ray_kvserve_kv_cache_demand_perc",
              "ray_kvserve_kv_host_cache_usage_perc",
              "ray_kvserve_prefix_cache_host_hits"]  # fmt: skip
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"not exported: {missing}"
    # Every series the Grafana dashboard queries is one Ray exports.
    import re

    dashboard = (Path(__file__).parents[1] / "k8s" / "base" / "grafana-kvserve.json").read_text()
    used = set(re.findall(r"ray_kvserve_\w+", dashboard))
    exported = set(re.findall(r"^(ray_kvserve_\w+)", text, re.M))
    assert used and used <= exported, f"dashboard queries unknown series: {sorted(used - exported)}"


def test_grpc_matches_http(grpc_stub: Any, client: Any) -> None:
    from protos import kvserve_pb2 as pb

    prompt = "The three primary colours are"
    http = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    req = pb.GenerateRequest(model=MODEL, text=prompt,
                             sampling=pb.SamplingOptions(max_tokens=20, temperature=0))  # fmt: skip
    unary = grpc_stub.Generate(req, timeout=120)
    assert unary.finished and unary.choices[0].text == http.choices[0].text
    assert unary.usage.prompt_tokens == http.usage.prompt_tokens
    assert unary.usage.completion_tokens == http.usage.completion_tokens
    assert unary.choices[0].finish_reason == http.choices[0].finish_reason
    parts = list(grpc_stub.GenerateStream(req, timeout=120))
    assert parts[-1].finished and not any(p.finished for p in parts[:-1])
    assert "".join(c.text for p in parts for c in p.choices) == http.choices[0].text
    assert [t for p in parts for c in p.choices for t in c.token_ids] == list(
        unary.choices[0].token_ids
    )
    chat = grpc_stub.Generate(pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Say hi.")]),
        sampling=pb.SamplingOptions(max_tokens=8, temperature=0)), timeout=120)  # fmt: skip
    assert chat.choices[0].text and chat.usage.completion_tokens <= 8
    models = grpc_stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert [m.id for m in models.models] == [MODEL] and models.models[0].max_model_len == 1024


def test_grpc_bad_input(grpc_stub: Any) -> None:
    import grpc

    from protos import kvserve_pb2 as pb

    cases = [
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(temperature=-1)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(sampling=pb.SamplingOptions(max_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**9])), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="gpt-17", text="hi"), grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for req, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            grpc_stub.Generate(req, timeout=60)
        assert info.value.code() == code, info.value.details()
        assert info.value.details()


def test_grpc_health(grpc_target: str) -> None:
    import grpc

    from protos import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        named = stub.Check(health_pb2.HealthCheckRequest(service="kvserve.v1.KVServe"), timeout=30)
        assert named.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_reflection(grpc_target: str) -> None:
    """Server reflection (Serve's gRPC servers offer it): the service list names
    KVServe and health, and the file that defines KVServe describes its three RPCs."""
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest
        listed = list(stub.ServerReflectionInfo(iter([ask(list_services="")]), timeout=30))
        names = {s.name for r in listed for s in r.list_services_response.service}
        assert {"kvserve.v1.KVServe", "grpc.health.v1.Health"} <= names, names
        found = list(stub.ServerReflectionInfo(
            iter([ask(file_containing_symbol="kvserve.v1.KVServe")]), timeout=30))  # fmt: skip
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for r in found for b in r.file_descriptor_response.file_descriptor_proto]  # fmt: skip
        service = next(s for f in files for s in f.service if s.name == "KVServe")
        assert {m.name for m in service.method} == {
        "Generate", "GenerateStream", "ListModels", "ResetPrefixCache",
    }  # fmt: skip


def test_loadgen_against_the_server(server: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    png, summary = tmp_path / "bench.png", tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", server, "--requests", "8",
           "--concurrency", "4", "--prompt-words", "20", "--max-tokens", "8", "--plot", str(png),
           "--json", str(summary)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(summary.read_text())
    assert result["ok"] == 8 and result["output_tokens"] == 64
    assert 0 < result["ttft_s"]["p50"] <= result["e2e_s"]["p99"]
    assert png.stat().st_size > 1000 and "ttft" in out.stdout
