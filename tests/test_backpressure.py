"""Full queues answer 429 with Retry-After (never a hang, never a 5xx), and every
request that was admitted completes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.factories import serving


def test_full_queues_give_429(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    """The replica's own limit refuses, whether the router or the replica's API asked."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", max_ongoing_requests=2,
                 max_queued_requests=1, engine={"max_model_len": 512}) as cfg:  # fmt: skip
        url = f"http://127.0.0.1:{cfg.http_port}/v1/completions"

        def one() -> None:
            r = httpx.post(url, json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400,
                                      "ignore_eos": True}, timeout=120)  # fmt: skip
            with lock:
                results.append(r)

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
