"""Full queues answer 429 with Retry-After (never a hang, never a 5xx), and every
request that was admitted completes."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_full_queues_give_429(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    from ray import serve

    from cluster.app import ServeConfig, run

    port = _free_port()
    cfg = ServeConfig(model=str(tiny_dirs["llama3"]), model_name="tiny", device="cpu",
                      http_port=port, grpc_port=0, max_ongoing_requests=2, max_queued_requests=1,
                      engine={"max_model_len": 512})  # fmt: skip
    run(cfg)
    url = f"http://127.0.0.1:{port}/v1/completions"
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = httpx.post(url, json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400,
                                  "ignore_eos": True}, timeout=120)  # fmt: skip
        with lock:
            results.append(r)

    try:
        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        codes = sorted(r.status_code for r in results)
        assert len(codes) == 10 and set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 1 and codes.count(200) >= 1
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["usage"]["completion_tokens"] == 400
    finally:
        serve.shutdown()
