"""The README's serving command on its own Ray: ``kvserve serve`` comes up on CPU with
SmolLM2, answers a chat request through its HTTP API, and stops."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench import loadgen
from cluster import netbind
from tests.factories import free_port


@pytest.mark.slow
def test_kvserve_serve_answers_a_chat_on_loopback_only(smollm2_dir: Path) -> None:
    """The README command answers a chat; its HTTP API, gRPC proxy and Ray dashboard
    listen on 127.0.0.1 only (issue 7's security item); Ctrl-C stops it cleanly."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    http, grpc = free_port(), free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--device", "cpu", "--max-model-len",
           "1024", "--port", str(http), "--grpc-port", str(grpc),
           "--chat", "What is the capital of France?"]  # fmt: skip
    with _kvserve_serve(cmd, env, timeout_s=400) as (_, text):
        assert "kvserve is up" in text and "Paris" in text
        # A quiet console: kvserve's own lines; Ray's, Serve's and HAProxy's stay in
        # Ray's log files (``--verbose`` shows them).
        assert "ServeController" not in text and "HAProxyManager" not in text, text
        assert len(text.splitlines()) <= 30, text
        assert "front          HAProxy" in text  # the default when kvserve starts Ray
        dashboard = int(re.search(r"Ray dashboard\s+http://127\.0\.0\.1:(\d+)", text)[1])  # type: ignore[index]
        binds = _listening({http, grpc, dashboard})
        assert set(binds) == {http, grpc, dashboard}, binds
        for port, ips in binds.items():
            assert all(_loopback(ip) for ip in ips), (port, ips)


@pytest.mark.slow
def test_kvserve_serve_disaggregated_fits_two_cores(smollm2_dir: Path) -> None:
    """The disaggregated mode comes up through the CLI on a Ray of the machine's real CPU
    count (2 in CI): prefill, decode and the router fit because the engine ranks share
    the cores the front leaves (``engine_cpus``) instead of waiting for more."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--device", "cpu", "--mode",
           "disaggregated", "--max-model-len", "1024", "--port", str(free_port()),
           "--grpc-port", "0", "--chat", "What is the capital of France?", "--exit"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    said = " ".join(done.stdout.split())  # the console wraps long lines
    assert "kvserve is up" in said and "1 prefill (TP 1) + 1 decode (TP 1)" in said
    assert "Paris" in done.stdout


def test_kvserve_serve_refuses_what_the_machine_lacks() -> None:
    """A local Ray cannot grow: asking it for a GPU it lacks fails at once, naming it."""
    env = {**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--device", "cuda", "--port",
           str(free_port()), "--grpc-port", "0", "--no-haproxy", "--exit"]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "needs 1 GPU (it has 0)" in done.stdout, done.stdout + done.stderr[-3000:]
    assert time.monotonic() - t0 < 60


@contextlib.contextmanager
def _kvserve_serve(cmd: list[str], env: dict[str, str],
                   timeout_s: float) -> Iterator[tuple[subprocess.Popen[str], str]]:  # fmt: skip
    """Runs ``kvserve serve`` (``cmd``) until it says it is serving; yields the process
    and its output so far. Afterwards Ctrl-C stops it (if the body did not), killed
    after 90 s."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    out: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "serving; Ctrl-C stops" in line:
                break
        text = "".join(out)
        assert "serving; Ctrl-C stops" in text, text[-4000:]
        yield proc, text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_status(gcs: str, env: dict[str, str]) -> str:
    """Serve's view of the applications (what a failed assertion shows beside its rows)."""
    code = (f"import ray; from ray import serve; ray.init(address={gcs!r}, "
            "logging_level='ERROR'); print(serve.status())")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**env, "RAY_AUTH_MODE": "token"})  # fmt: skip
    return (done.stdout + done.stderr)[-4000:]


def _listening(ports: set[int]) -> dict[int, list[str]]:
    """The addresses listening on ``ports`` (TCP, any process of this user)."""
    found: dict[int, list[str]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
            found.setdefault(conn.laddr.port, []).append(conn.laddr.ip)
    return found


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, gRPC's spelling)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_plan_shows_the_formula() -> None:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", "--model", "llama3-8b-shape",
                          "--tp", "2", "--gpu-memory-gib", "80"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "32 layers × 2 × 4 kv heads × 128 head_dim × 2 B = 65,536 B" in out.stdout
    assert "sessions of 8,192 tokens" in out.stdout
    assert "(each 512 blocks)" in out.stdout  # the scheduler's arithmetic: whole blocks


def test_grpc_proxy_address_rewrite() -> None:
    assert netbind.grpc_address("[::]:9000", "127.0.0.1") == "127.0.0.1:9000"
    assert netbind.grpc_address("[::]:9000", "::1") == "[::1]:9000"
    assert netbind.grpc_address("[::]:0", "") == "[::]:0"
    assert netbind.grpc_address("10.0.0.5:9000", "127.0.0.1") == "10.0.0.5:9000"
    assert netbind.runtime_env("0.0.0.0") == {}
    assert netbind.runtime_env("127.0.0.1")["env_vars"] == {netbind.HOST_ENV: "127.0.0.1"}


@pytest.mark.slow
def test_kvserve_serve_behind_haproxy(tiny_dirs: dict[str, Path]) -> None:
    """``kvserve serve --haproxy`` on its own Ray: HAProxy in front of the API replicas,
    which reach the engine replica's core over TCP (no Python proxy and no Ray call in
    the token path). Completions (whole and streamed) equal the offline engine's, gRPC
    equals HTTP (reflection answers too), a client that leaves mid-stream gets its
    blocks back (read with ``kvserve status``), and every port HAProxy, the API and the
    core listen on is on loopback (HAProxy's stats and metrics ports too, which Serve
    binds to every interface); SIGTERM stops it and its HAProxy. The removed
    ``--ingress`` flag is refused, naming what replaced it."""
    import httpx

    from engine import LLM
    from engine.sampling_params import SamplingParams

    model = tiny_dirs["llama3"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    http, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--haproxy", "--model", str(model),
           "--model-name", "tiny", "--device", "cpu", "--max-model-len", "256",
           "--port", str(http), "--grpc-port", str(grpc_port)]  # fmt: skip
    refused = subprocess.run([*cmd, "--ingress", "engine"], capture_output=True, text=True,
                             timeout=120, env=env)  # fmt: skip
    assert refused.returncode == 2 and "'ingress' is gone" in refused.stdout, refused.stdout
    with _kvserve_serve(cmd, env, timeout_s=300) as (proc, text):
        assert "HAProxy (Serve's direct ingress) to 2 API replicas" in text, text[-4000:]
        gcs = re.search(r"Ray cluster\s+(\S+)", text)[1]  # type: ignore[index]
        base = f"http://127.0.0.1:{http}"

        prompts = ["w1 w2 w3 w4 w5", "w9 w8 w7"]
        refs = LLM(model, device="cpu", max_model_len=256).generate(
            prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
        for prompt, ref in zip(prompts, refs, strict=True):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            whole = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
            assert whole["choices"][0]["text"] == ref.outputs[0].text
            streamed = ""
            with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                              timeout=60) as r:  # fmt: skip
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        streamed += json.loads(line[6:])["choices"][0]["text"]
            assert streamed == ref.outputs[0].text
        # The load client (aiohttp, as ``python -m bench.loadgen``) and the first token's split:
        # each part of the replica's within its whole; the time outside it, both ways.
        records, _ = asyncio.run(loadgen.http_load(base, "tiny", prompts, 12, 2, None,
                                                   progress=False))  # fmt: skip
        for rec in records:
            assert rec.error is None and rec.text == refs[prompts.index(rec.prompt)].outputs[0].text
            t = rec.timing_ms
            assert 0 <= t["replica_queue"] < t["replica_first_delta"], t
            assert t["client_to_replica"] >= 0 and t["replica_to_client"] >= 0, t
            assert 0 <= t["client_send"] <= t["client_to_replica"], t
            assert 0 <= t["api_place"] <= t["api_first_delta"], t
            assert 0 <= t["engine_ttft"] <= t["replica_first_delta"], t

        import grpc

        from protos import kvserve_pb2 as pb
        from protos import kvserve_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = kvserve_pb2_grpc.KVServeStub(channel)
            reply = stub.Generate(pb.GenerateRequest(model="tiny", text=prompts[0],
                sampling=pb.SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True)),
                timeout=60)  # fmt: skip
            assert reply.choices[0].text == refs[0].outputs[0].text
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([ask]), timeout=30)  # fmt: skip
            names = {s.name for r in listed for s in r.list_services_response.service}
            assert "kvserve.v1.KVServe" in names, names  # reflection through HAProxy

        # A client that leaves mid-stream: its request ends and its blocks come back.
        body = {"model": "tiny", "prompt": "w3 " * 40, "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    break
        status = [sys.executable, "-m", "cluster.cli", "status", "--address", gcs, "--json"]
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(status, capture_output=True, text=True, timeout=60,
                                  env={**env, "RAY_AUTH_MODE": "token"})  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            rows = json.loads(done.stdout)  # [] until the replica's report is in
            if rows and rows[0]["running"] == 0 and rows[0]["free_blocks"] == rows[0]["num_blocks"]:
                assert 0 <= rows[0]["loop_lag_p50_ms"] <= rows[0]["loop_lag_max_ms"], rows
                break
            assert time.monotonic() < deadline, (rows, _serve_status(gcs, env))
            time.sleep(1)

        haproxy_ports = {c.laddr.port: c.laddr.ip for p in psutil.process_iter(["name"])
                         if p.info["name"] == "haproxy" for c in p.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}  # fmt: skip
        assert {http, grpc_port} <= set(haproxy_ports), haproxy_ports
        assert all(_loopback(ip) for ip in haproxy_ports.values()), haproxy_ports
        binds = _listening({http, grpc_port})
        assert all(_loopback(ip) for ips in binds.values() for ip in ips), binds
        core = rows[0]["core"]  # where the engine replica's core listens (the ledger row)
        host, _, port = core.removeprefix("tcp://").rpartition(":")
        assert _loopback(host) and set(_listening({int(port)})[int(port)]) == {host}, core

        # SIGTERM stops it like Ctrl-C, HAProxy included (it would keep the ports).
        haproxies = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        _, alive = psutil.wait_procs(haproxies, timeout=30)
        assert not alive, alive


def test_gpu_suite_names_workloads_in_any_case() -> None:
    """``--workloads w5-paging,W10`` picks the runners by name, whatever the case; an unknown
    name is a usage error that lists the known ones."""
    from bench import gpu

    args = gpu.parse_args(["--workloads", "w5-paging, W10,w1"])
    assert args.workloads == ["W1", "W5-paging", "W10"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--workloads", "W5-pages"])


def test_w10_headline_is_against_the_faster_tier_off_run() -> None:
    """With the control run, W10's first ratio (the report's headline) divides by the faster
    of the two tier-off runs, so run-to-run noise cannot pass for the tier's gain."""
    from bench import multiturn

    def run(p50: float, computed: int) -> dict[str, float]:
        return {"ttft_p50_s": p50, "ttft_p99_s": 2 * p50, "prompt_tokens_computed": computed}

    agree = {"identical": 0.5, "first_difference_at": 0.5}
    raw = {
        "off": run(0.8, 1000),
        "on": run(0.2, 150),
        "off_again": run(0.16, 990),
        "same_tokens": False,
        "agreement": {"off_vs_on": agree, "off_vs_off_again": agree},
    }
    r = multiturn.ratios(raw)
    assert next(iter(r)) == "ttft_p50_faster_off_over_on"
    assert r["ttft_p50_faster_off_over_on"] == pytest.approx(0.8)
    assert r["ttft_p50_off_over_on"] == pytest.approx(4.0)
    assert r["prompt_computed_on_over_off"] == pytest.approx(0.15)
    del raw["off_again"]
    assert next(iter(multiturn.ratios(raw))) == "ttft_p50_off_over_on"
