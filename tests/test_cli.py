"""The README's serving command on its own Ray: ``kvserve serve`` comes up on CPU with
SmolLM2, answers a chat request through its HTTP API, and stops."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    out: list[str] = []
    try:
        deadline = time.monotonic() + 400
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
        assert "kvserve is up" in text and "Paris" in text
        dashboard = int(re.search(r"Ray dashboard\s+http://127\.0\.0\.1:(\d+)", text)[1])  # type: ignore[index]
        binds = _listening({http, grpc, dashboard})
        assert set(binds) == {http, grpc, dashboard}, binds
        for port, ips in binds.items():
            assert all(_loopback(ip) for ip in ips), (port, ips)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def test_grpc_proxy_address_rewrite() -> None:
    assert netbind.grpc_address("[::]:9000", "127.0.0.1") == "127.0.0.1:9000"
    assert netbind.grpc_address("[::]:9000", "::1") == "[::1]:9000"
    assert netbind.grpc_address("[::]:0", "") == "[::]:0"
    assert netbind.grpc_address("10.0.0.5:9000", "127.0.0.1") == "10.0.0.5:9000"
    assert netbind.runtime_env("0.0.0.0") == {}
    assert netbind.runtime_env("127.0.0.1")["env_vars"] == {netbind.HOST_ENV: "127.0.0.1"}
