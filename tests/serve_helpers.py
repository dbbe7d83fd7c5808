"""Helpers of the tests that fault a running Serve app: streaming clients in threads,
the app's replica actors by deployment, waiting for pools to be whole again."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from bench.soak import kill_replica, replica_ids

__all__ = [
    "PROMPTS",
    "Stream",
    "kill_a_rank_mid_stream",
    "kill_replica",
    "replica_ids",
    "stats_of",
    "wait_until",
    "wait_whole",
]

# Prompts of the fault tests (SmolLM2: varied lengths, several kinds of text).
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "1, 2, 3, 4, 5,",
    "The history of the printing press begins in the fifteenth century, when",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


class Stream(threading.Thread):
    """One streaming completion in a thread: its text pieces as they arrive, whether it
    ended with ``[DONE]``, any in-band error, and the final ``kvserve`` extension."""

    def __init__(self, base: str, prompt: Any, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.prompt, self.model, self.max_tokens = base, prompt, model, max_tokens
        self.pieces: list[str] = []
        self.done = False
        self.error: str | None = None
        self.status: int | None = None
        self.kv: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}

    def run(self) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body,
                              timeout=180) as r:  # fmt: skip
                self.status = r.status_code
                if r.status_code != 200:
                    r.read()
                    self.error = r.text
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]["message"]
                        continue
                    self.pieces.extend(c["text"] for c in chunk["choices"] if c["text"])
                    if chunk.get("usage"):
                        self.usage, self.kv = chunk["usage"], chunk.get("kvserve", {})
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def stats_of(deployment: str) -> list[dict[str, Any]]:
    """Every live replica's stats (each asked by its id through the request router)."""
    from ray import serve

    h = serve.get_deployment_handle(deployment, app_name="kvserve")
    return [dict(h.stats.options().remote(target=i).result(timeout_s=30))
            for i in sorted(replica_ids(deployment))]  # fmt: skip


def wait_whole(deployment: str, replicas: int, timeout: float = 120) -> list[dict[str, Any]]:
    """Waits until the deployment has ``replicas`` live replicas, each with an empty queue
    and every block free; returns their stats."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            ids = replica_ids(deployment)
            if len(ids) == replicas:
                last = stats_of(deployment)
                if all(s["running"] == 0 and s["waiting"] == 0 and not s["dead"]
                       and s["free_blocks"] == s["num_blocks"] for s in last):  # fmt: skip
                    return last
        except Exception as e:  # a replica starting or stopping
            last = e
        time.sleep(1.0)
    raise AssertionError(f"{deployment} not whole: {last}")


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def wait_attached(base: str, cores: int, timeout: float = 60) -> None:
    """Until every API replica (polled through the proxy) has links to ``cores``
    engine cores: a replica is ready once one core is attached, and attaches to the
    others the ledger lists within about a second."""

    def all_attached() -> bool:
        for _ in range(8):  # the proxy spreads the polls over the API replicas
            r = httpx.get(f"{base}/health", timeout=10)
            if r.status_code != 200 or not r.json().get("instances", "").startswith(f"{cores} "):
                return False
        return True

    wait_until(all_attached, timeout, f"API replicas attached to {cores} cores")


def kill_a_rank_mid_stream(deployment: str, base: str, prompts: list[Any], model: str,
                           max_tokens: int) -> tuple[list[Stream], str]:  # fmt: skip
    """Streams every prompt (spread over the deployment's replicas), and once each has
    output a few pieces kills a rank actor of the first replica (TP > 1, it running some
    of them); returns the finished streams and that replica's id."""
    import ray
    from ray import serve

    before = replica_ids(deployment)
    wait_attached(base, len(before))  # the streams spread over every replica
    streams = [Stream(base, p, model, max_tokens) for p in prompts]
    for st in streams:
        st.start()
    wait_until(lambda: all(len(st.pieces) >= 4 for st in streams), 120, "streams to run")
    victim = sorted(before)[0]
    h = serve.get_deployment_handle(deployment, app_name="kvserve")
    stats = h.stats.options().remote(target=victim).result(timeout_s=30)
    assert stats["tp"] > 1 and stats["running"] > 0, stats
    namespace, name = stats["rank_actors"][0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    for st in streams:
        st.join(180)
    return streams, victim
