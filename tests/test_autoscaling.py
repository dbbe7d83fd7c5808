"""The engine pool scales with load through Serve's autoscaling and the KV-aware policy:
1 → 2 replicas under sustained load, back to 1 after it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import serving


def _engine_replicas() -> int:
    from ray import serve

    status = serve.status().applications["kvserve"].deployments["engine"]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.mark.slow
def test_pool_scales_up_under_load_and_back_down(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                   "metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1,
                   "downscale_delay_s": 4}  # fmt: skip
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", autoscaling=autoscaling,
                 engine={"max_num_seqs": 4, "max_model_len": 512}) as cfg:  # fmt: skip
        url = f"http://127.0.0.1:{cfg.http_port}/v1/completions"
        assert _engine_replicas() == 1
        stop = threading.Event()
        errors: list[str] = []

        def load() -> None:
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    r = client.post(url, json={"model": "tiny", "prompt": [5, 6, 7, 8],
                                               "max_tokens": 300, "ignore_eos": True})  # fmt: skip
                    if r.status_code != 200:
                        errors.append(r.text)

        threads = [threading.Thread(target=load) for _ in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while _engine_replicas() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        scaled_up = _engine_replicas()
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:2]
        assert scaled_up == 2
        deadline = time.monotonic() + 90
        while _engine_replicas() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _engine_replicas() == 1


class _Config:
    def get_target_ongoing_requests(self) -> float:
        return 4.0


def _ctx(n: int, ongoing: float, kv: list[float], waiting: list[float]) -> Any:
    from types import SimpleNamespace

    replicas = [f"r{i}" for i in range(n)]
    metrics = {"kv_usage": dict(zip(replicas, kv, strict=True)),
               "waiting": dict(zip(replicas, waiting, strict=True))}  # fmt: skip
    return SimpleNamespace(current_num_replicas=n, target_num_replicas=n, total_num_requests=ongoing,
                           config=_Config(), aggregated_metrics=metrics, policy_state={})  # fmt: skip


def test_policy_scales_on_kv_pressure_and_waiting_not_only_requests() -> None:
    from cluster.placement.autoscale import kv_aware_policy

    idle, _ = kv_aware_policy(_ctx(2, ongoing=1, kv=[0.1, 0.1], waiting=[0, 0]))
    assert idle < 2  # few requests, empty caches: shrink
    full, _ = kv_aware_policy(_ctx(1, ongoing=2, kv=[0.95], waiting=[0]))
    assert full > 1  # two long sessions fill the cache: grow, though requests are few
    queued, state = kv_aware_policy(_ctx(1, ongoing=3, kv=[0.5], waiting=[2]))
    assert queued >= 2 and state["last"]["waiting"] == 2
