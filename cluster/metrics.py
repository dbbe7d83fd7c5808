"""Engine metrics through ``ray.util.metrics``, named after vLLM's (``vllm:`` becomes
``kvserve_``) so existing dashboards map over. Ray exports them in Prometheus text at
each node's metrics export port with its own ``ray_`` prefix:
``ray_kvserve_time_to_first_token_seconds_bucket{model=...,replica=...}``.

Per request (observed by the replica as tokens stream out): time to first token,
inter-token latency, end-to-end latency, prompt and generation tokens (the generation
counter advances once a second by the tokens streamed since). Per instance
(sampled every second from the engine's counters): requests running and waiting, KV
cache usage, prefix-cache queries and hits (tokens), preemptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from ray.util import metrics

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]  # fmt: skip
TAGS = ("model", "replica")


class EngineMetrics:
    def __init__(self, model: str, replica: str) -> None:
        self.tags = {"model": model, "replica": replica}
        self.ttft = metrics.Histogram(
            "kvserve_time_to_first_token_seconds", "Time to first token",
            boundaries=LATENCY_BUCKETS, tag_keys=TAGS,
        )  # fmt: skip
        self.itl = metrics.Histogram(
            "kvserve_inter_token_latency_seconds", "Time between consecutive output tokens",
            boundaries=LATENCY_BUCKETS, tag_keys=TAGS,
        )  # fmt: skip
        self.e2e = metrics.Histogram(
            "kvserve_e2e_request_latency_seconds", "Arrival to last token",
            boundaries=LATENCY_BUCKETS, tag_keys=TAGS,
        )  # fmt: skip
        self.prompt_tokens = metrics.Counter(
            "kvserve_prompt_tokens", "Prompt tokens processed", tag_keys=TAGS
        )
        self.generation_tokens = metrics.Counter(
            "kvserve_generation_tokens", "Tokens generated", tag_keys=TAGS
        )
        self.running = metrics.Gauge(
            "kvserve_num_requests_running", "Requests running", tag_keys=TAGS
        )
        self.waiting = metrics.Gauge(
            "kvserve_num_requests_waiting", "Requests waiting", tag_keys=TAGS
        )
        self.kv_usage = metrics.Gauge(
            "kvserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", tag_keys=TAGS
        )
        self.loop_lag = metrics.Gauge(
            "kvserve_api_event_loop_lag_seconds",
            "How late the replica's event loop ran what was due (p99 over the last second)",
            tag_keys=TAGS,
        )  # fmt: skip
        self.prefix_queries = metrics.Counter(
            "kvserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
            tag_keys=TAGS,
        )  # fmt: skip
        self.prefix_hits = metrics.Counter(
            "kvserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", tag_keys=TAGS
        )
        self.prefix_host_hits = metrics.Counter(
            "kvserve_prefix_cache_host_hits",
            "Prompt tokens found on the host-memory tier (restored by copy; of the hits)",
            tag_keys=TAGS,
        )  # fmt: skip
        self.host_usage = metrics.Gauge(
            "kvserve_kv_host_cache_usage_perc", "Fraction of host-tier KV blocks holding a prefix",
            tag_keys=TAGS,
        )  # fmt: skip
        self.kv_demand = metrics.Gauge(
            "kvserve_kv_cache_demand_perc",
            "KV blocks held plus the decode blocks admitted requests may still take (0-1)",
            tag_keys=TAGS,
        )  # fmt: skip
        self.preemptions = metrics.Counter(
            "kvserve_num_preemptions", "Requests preempted (recomputed later)", tag_keys=TAGS
        )
        # Disaggregated pools: K/V moved prefill -> decode, counted by the decode side.
        self.kv_transfer_bytes = metrics.Counter(
            "kvserve_kv_transfer_bytes_total", "K/V bytes received from prefill instances",
            tag_keys=TAGS,
        )  # fmt: skip
        self.kv_transfer_seconds = metrics.Histogram(
            "kvserve_kv_transfer_seconds", "Time of one request's K/V transfer (receive side)",
            boundaries=LATENCY_BUCKETS, tag_keys=TAGS,
        )  # fmt: skip
        self.kv_transfer_failures = metrics.Counter(
            "kvserve_kv_transfer_failures_total",
            "Disaggregated requests whose prefill or transfer failed (recomputed locally)",
            tag_keys=TAGS,
        )  # fmt: skip
        for m in (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens,
                  self.running, self.waiting, self.kv_usage, self.loop_lag, self.prefix_queries,
                  self.prefix_hits, self.prefix_host_hits, self.host_usage, self.kv_demand,
                  self.preemptions, self.kv_transfer_bytes,
                  self.kv_transfer_seconds, self.kv_transfer_failures):  # fmt: skip
            m.set_default_tags(self.tags)
        # Publish every counter at 0 from the start (Prometheus practice: a series that
        # exists before its first event makes rate() and dashboards work). Ray's public
        # inc() refuses 0, so this uses its recording call; skipped if that changes.
        for c in (self.prompt_tokens, self.generation_tokens, self.prefix_queries,
                  self.prefix_hits, self.prefix_host_hits, self.preemptions, self.kv_transfer_bytes,
                  self.kv_transfer_failures):  # fmt: skip
            record = getattr(c, "_record", None)
            if record is not None:
                with contextlib.suppress(Exception):  # newer Ray: appears at its first event
                    record(0.0)
        self._last: dict[str, float] = {}
        # Tokens generated: ``RequestTimer`` adds here (one thread, the event loop that
        # streams them; a plain add per delta) and ``sample`` (another thread) advances
        # the counter by what grew, once a second, instead of a Ray metric call per token.
        self.generated_total = 0
        self._generated_reported = 0

    def sample(self, stats: dict[str, Any]) -> None:
        """Gauges from a stats snapshot; counters advance by what grew since the last."""
        self.flush_tokens()
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])
        self.kv_demand.set(stats["kv_demand"])
        host = stats["host_blocks"]
        self.host_usage.set(stats["host_cached_blocks"] / host if host else 0.0)
        if "loop_lag_p99_ms" in stats:
            self.loop_lag.set(stats["loop_lag_p99_ms"] / 1e3)
        for key, counter in (("prefix_cache_queries", self.prefix_queries),
                             ("prefix_cache_hits", self.prefix_hits),
                             ("prefix_cache_host_hits", self.prefix_host_hits),
                             ("preemptions", self.preemptions)):  # fmt: skip
            grown = stats[key] - self._last.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self._last[key] = stats[key]

    def flush_tokens(self) -> None:
        """Advances the generated-tokens counter by what ``RequestTimer`` added since
        (one thread calls it, about once a second)."""
        total = self.generated_total  # read once: the loop thread may add meanwhile
        if total > self._generated_reported:
            self.generation_tokens.inc(total - self._generated_reported)
            self._generated_reported = total


class RequestTimer:
    """Times one request's tokens into ``EngineMetrics`` (monotonic clock)."""

    def __init__(self, m: EngineMetrics, arrival: float) -> None:
        self.m = m
        self.arrival = arrival
        self.last: float | None = None

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        self.m.generated_total += n  # EngineMetrics.sample reports it
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
            n -= 1
        elif n > 0:
            gap = (now - self.last) / n  # several tokens in one delta (n samples): spread
            for _ in range(n):
                self.m.itl.observe(gap)
        self.last = now

    def finish(self, now: float, prompt_tokens: int) -> None:
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.e2e.observe(now - self.arrival)


class LoopLag:
    """How late an event loop runs what is due: the wait that every request's arrival,
    each streamed chunk and the engine's outputs meet there (an engine replica's
    ``loop_lag_*_ms`` in its reports, and a gauge). Sampled every ``period_s`` once
    ``start``ed on the loop."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self._lags: list[float] = []  # seconds late, since the last ``stats``
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period_s)
            self._lags.append(time.monotonic() - t - self.period_s)

    def stats(self) -> dict[str, float]:
        """p50, p99 and max lag (ms) since the last call; {} when nothing was sampled."""
        lags, self._lags = self._lags, []
        if not lags:
            return {}
        lags.sort()
        return {"loop_lag_p50_ms": round(lags[len(lags) // 2] * 1e3, 3),
                "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1e3, 3),
                "loop_lag_max_ms": round(lags[-1] * 1e3, 3)}  # fmt: skip
