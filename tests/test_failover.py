"""Failover: a request whose engine instance dies goes on elsewhere, the client's stream
continues with no gap and no repeat, and the output equals an undisturbed run.

The engine resumes a request from its prompt plus the tokens it had produced
(``LLMEngine.add_request(resume=...)``); the API process (``cluster.api.server``) re-places it when its
replica dies (``cluster.api.server``). Health tells the truth while instances die and come
back. Real Ray, real Serve, real ``ray.kill``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import SamplingParams
from tests.factories import free_port, serving
from tests.serve_helpers import (
    PROMPTS,
    Stream,
    kill_replica,
    replica_ids,
    wait_attached,
    wait_until,
    wait_whole,
)

MODEL = "smol-failover"
MAX_TOKENS = 48


# --- the engine resumes a request ----------------------------------------------------------
def _run(engine: Any, prompt: str, params: SamplingParams, resume: list[int] | None = None
         ) -> Any:  # fmt: skip
    rid = engine.add_request(prompt, params, resume=resume or ())
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            last = out
    return last


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
        SamplingParams(
            temperature=0,
            max_tokens=24,
            frequency_penalty=0.8,
            presence_penalty=0.5,
            ignore_eos=True,
        ),
        SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "penalties", "logprobs"],
)
def test_engine_resume_equals_an_undisturbed_run(smollm2_llm: Any, params: SamplingParams) -> None:
    engine = smollm2_llm.engine
    prompt = "The three most important inventions of the last century are"
    full = _run(engine, prompt, params).outputs[0]
    for cut in (1, 9, 23):
        resumed = _run(engine, prompt, params, full.token_ids[:cut]).outputs[0]
        assert resumed.token_ids == full.token_ids, cut
        assert resumed.text == full.text
        assert resumed.finish_reason == full.finish_reason == "length"
        if params.logprobs is not None:  # the new tokens' logprobs match the full run's
            assert resumed.logprobs is not None and full.logprobs is not None
            for a, b in zip(resumed.logprobs[-(24 - cut) :], full.logprobs[cut:], strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert engine.pool_is_whole()


def test_engine_resume_refuses_what_cannot_resume(smollm2_llm: Any) -> None:
    engine = smollm2_llm.engine
    p = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="nothing left to resume"):
        engine.add_request("Hello", p, resume=[5, 6, 7, 8])
    with pytest.raises(ValueError, match="n=1"):
        engine.add_request("Hello", SamplingParams(n=2, max_tokens=4), resume=[5])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("Hello", p, resume=[-1])
    assert not engine.has_unfinished_requests()


# --- through Serve: a replica dies mid-stream ----------------------------------------------
@pytest.fixture(scope="module")
def reference(smollm2_llm: Any) -> list[str]:
    outs = smollm2_llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    return [o.outputs[0].text for o in outs]


def test_a_replica_killed_mid_stream_loses_no_request(
    ray_cluster: Any, smollm2_dir: Path, reference: list[str]
) -> None:
    """Two replicas; one is killed (``ray.kill``) while every stream is half-way: all
    requests finish with the undisturbed text, those it served resumed elsewhere; Serve
    starts a replacement that joins the ledger; every block comes back."""
    with serving(model=str(smollm2_dir), model_name=MODEL, num_replicas=2,
                 engine={"max_model_len": 512}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        before = replica_ids("engine")
        assert len(before) == 2
        wait_attached(base, 2)  # the streams spread over both
        streams = [Stream(base, p, MODEL, MAX_TOKENS) for p in PROMPTS * 2]
        for s in streams:
            s.start()
        wait_until(lambda: all(len(s.pieces) >= 4 for s in streams), 120, "streams to start")
        victim = sorted(before)[0]
        kill_replica("engine", victim)
        for s in streams:
            s.join(180)
        for s, want in zip(streams, reference * 2, strict=True):
            assert s.error is None and s.done, (s.error, s.prompt)
            assert s.text == want, s.prompt
            assert s.usage["completion_tokens"] == MAX_TOKENS
        resumed = [s.kv for s in streams if s.kv.get("mode") == "resumed"]
        assert resumed, [s.kv for s in streams]
        assert all(kv["instance"] != victim and kv["resumed_tokens"] > 0 for kv in resumed)
        # Serve replaced the dead replica; it reports to the ledger; nothing leaked.
        whole = wait_whole("engine", 2)
        assert victim not in {s["instance"] for s in whole}
        from cluster.placement.ledger import get_ledger

        wait_until(lambda: {s["instance"] for s in whole} <= {
            r["instance_id"] for r in ray_cluster.get(get_ledger().instances.remote())
        }, 30, "the replacement in the ledger")  # fmt: skip


def test_health_tells_the_truth_and_no_capacity_is_a_clear_503(
    ray_cluster: Any, smollm2_dir: Path
) -> None:
    """One replica. Killed mid-stream with nowhere to go: the stream ends with an in-band
    error (no ``[DONE]``), a new request gets 503 + Retry-After, ``/health`` and gRPC
    health say NOT_SERVING within seconds; once Serve has replaced it, both recover and
    requests are served again."""
    import grpc

    from protos import health_pb2, health_pb2_grpc

    grpc_port = free_port()
    with serving(model=str(smollm2_dir), model_name=MODEL, grpc_port=grpc_port,
                 engine={"max_model_len": 512},
                 failover_timeout_s=2.0, place_timeout_s=3.0) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)

        def grpc_status() -> int:
            try:
                return int(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
            except grpc.RpcError:
                return -1

        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 60,
                   "health")  # fmt: skip
        assert grpc_status() == health_pb2.HealthCheckResponse.SERVING
        (victim,) = replica_ids("engine")
        s = Stream(base, PROMPTS[3], MODEL, 200)
        s.start()
        wait_until(lambda: len(s.pieces) >= 4, 60, "the stream to start")
        t_kill = time.monotonic()
        kill_replica("engine", victim)
        s.join(60)
        assert not s.done and s.error is not None, (s.done, s.error)
        assert "no engine instance could take the request" in s.error
        r = httpx.get(f"{base}/health", timeout=10)
        seen_down = r.status_code == 503
        while not seen_down and time.monotonic() - t_kill < 10:
            time.sleep(0.2)
            seen_down = httpx.get(f"{base}/health", timeout=10).status_code == 503
        assert seen_down, "health stayed green with no engine instance"
        assert grpc_status() in (health_pb2.HealthCheckResponse.NOT_SERVING, -1) or (
            replica_ids("engine") - {victim}
        )  # a replacement may already be up
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        if r.status_code != 200:  # still no replica: a clear, retriable error
            assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
            assert r.json()["error"]["code"] == "engine_unavailable"
        # Serve replaces the replica; health and serving recover.
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 120,
                   "health to recover")  # fmt: skip
        wait_until(lambda: grpc_status() == health_pb2.HealthCheckResponse.SERVING, 30,
                   "gRPC health to recover")  # fmt: skip
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        wait_whole("engine", 1)
        channel.close()
