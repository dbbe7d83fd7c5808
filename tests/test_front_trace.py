"""cluster.front_trace: the HTTP server's parse stamp reaches the app's scope (a real
uvicorn server on loopback, a real client), and the stall sampler names what blocked
the event loop and writes its counts."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cluster import front_trace


@pytest.fixture
def tracing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(front_trace, "TRACE_DIR", str(tmp_path))
    return tmp_path


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_trace, "TRACE_DIR", None)
    assert front_trace.stamp_http_reads() is False


def test_parse_stamp_reaches_the_app(tracing: Path) -> None:
    assert front_trace.stamp_http_reads() is True
    assert front_trace.stamp_http_reads() is True  # once: a second call patches nothing
    seen: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(time.monotonic() - scope[front_trace.HTTP_READ_KEY])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def main() -> list[int]:
        server = uvicorn.Server(uvicorn.Config(app, http="httptools", log_level="error",
                                               lifespan="off"))  # fmt: skip
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            codes = [(await client.get(f"http://127.0.0.1:{port}/")).status_code
                     for _ in range(3)]  # fmt: skip
        server.should_exit = True
        await task
        return codes

    assert asyncio.run(main()) == [200, 200, 200]
    assert len(seen) == 3 and all(0 <= s < 5.0 for s in seen)


def _block_the_loop() -> None:
    time.sleep(0.06)


def test_stall_sampler_names_the_blocker(tracing: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front_trace, "WRITE_EVERY_S", 0.05)

    async def main() -> front_trace.StallSampler:
        import threading

        sampler = front_trace.StallSampler(threading.get_ident())

        async def heartbeat() -> None:
            while True:
                sampler.beat()
                await asyncio.sleep(0.005)

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        for _ in range(3):
            _block_the_loop()  # the loop stalls 60 ms, three times
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.2)  # a write after the stalls
        beat.cancel()
        sampler.stop()
        return sampler

    sampler = asyncio.run(main())
    assert sampler.stalls >= 3
    assert any("_block_the_loop" in stack for stack in sampler.stacks)
    data = json.loads(sampler.path.read_text())
    assert data["stalls"] >= 3 and data["samples"] > 0
    assert any("_block_the_loop" in stack for stack, _ in data["stacks"])
