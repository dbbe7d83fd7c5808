"""A pool replica: one engine instance (over one worker group) as a Serve deployment.

The router calls ``generate`` through a streaming handle with a plain-dict request and
gets plain-dict deltas back, one per engine step that advanced the request:

    {"request_id", "prompt_tokens", "cached_tokens", "finished",
     "choices": [{"index", "text", "token_ids", "logprobs", "finish_reason"}]}

``text`` / ``token_ids`` / ``logprobs`` hold only what is new since the previous item.
Bad input yields one ``{"error": message}`` item and ends. Cancelling the stream (the
client went away) aborts the request in the engine, so its blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.async_engine import AsyncEngine
from cluster.ledger import get_ledger
from cluster.metrics import EngineMetrics, RequestTimer
from engine.llm_engine import EngineArgs
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


REPORT_PERIOD_S = 1.0


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (a test building the class directly)
        return f"local-{uuid.uuid4().hex[:8]}"


class EngineReplica:
    def __init__(self, engine_args: dict[str, Any], model_name: str, role: str = "both",
                 stream_interval_s: float = 0.0) -> None:  # fmt: skip
        self.model_name = model_name
        # Least time between two messages of one stream after the first token: fewer,
        # larger messages through Serve when many streams run (0: one per step).
        self.stream_interval_s = stream_interval_s
        self.role = role
        self.replica_id = _replica_id()
        self.engine = AsyncEngine(EngineArgs(**engine_args))
        self.tokenizer = self.engine.engine.tokenizer
        self.max_model_len = self.engine.engine.scheduler_config.max_model_len
        self.metrics = EngineMetrics(model_name, self.replica_id)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="kvserve-report",
                                          daemon=True)  # fmt: skip
        self._reporter.start()

    def _report_loop(self) -> None:
        """Every second: metrics gauges/counters and a ledger report."""
        ledger = None
        while not self._stop.wait(REPORT_PERIOD_S):
            stats = self.engine.stats()
            self.metrics.sample(stats)
            try:
                ledger = ledger or get_ledger()
                ledger.report.remote(self.replica_id, {**stats, "role": self.role,
                                                       "model": self.model_name})  # fmt: skip
            except Exception as e:  # the ledger is advisory: serving goes on without it
                logger.warning("ledger report failed: %s", e)
                ledger = None

    def __del__(self) -> None:
        self._stop.set()

    async def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len}

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``cluster.autoscale.kv_aware_policy`` scales on (Serve collects it)."""
        s = self.engine.stats()
        return {"kv_usage": float(s["kv_usage"]), "waiting": float(s["waiting"]),
                "running": float(s["running"])}  # fmt: skip

    async def check_health(self) -> None:
        """Serve's health check: a dead engine (or worker group) fails it."""
        self.engine.check_health()

    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        params: SamplingParams = req["params"]
        arrival = time.monotonic()
        try:
            if req.get("messages") is not None:
                prompt: str | list[int] = self.engine.engine.apply_chat_template(req["messages"])
            else:
                prompt = req["prompt"]
            stream = self.engine.generate(prompt, params, req.get("request_id"))
            first = await anext(stream)
        except ValueError as e:
            yield {"error": str(e)}
            return
        sent: dict[int, tuple[int, int]] = {}
        timer = RequestTimer(self.metrics, arrival)
        out: RequestOutput | None = first
        while out is not None:
            delta = self._delta(out, sent)
            now = time.monotonic()
            timer.tokens(sum(len(c["token_ids"]) for c in delta["choices"]), now)
            if out.finished:
                timer.finish(now, delta["prompt_tokens"])
            if delta["choices"] or out.finished:
                yield delta
            if out.finished:
                break
            if self.stream_interval_s and timer.last is not None:
                await asyncio.sleep(self.stream_interval_s)  # outputs pile up; newest wins
            out = await anext(stream, None)

    def _delta(self, out: RequestOutput, sent: dict[int, tuple[int, int]]) -> dict[str, Any]:
        choices = []
        for c in out.outputs:
            text_at, tok_at = sent.get(c.index, (0, 0))
            text = c.text[text_at:]
            tokens = c.token_ids[tok_at:]
            if not text and not tokens and not c.finished:
                continue
            sent[c.index] = (len(c.text), len(c.token_ids))
            choices.append({
                "index": c.index, "text": text, "token_ids": tokens,
                "logprobs": self._logprobs(c, tok_at), "finish_reason": c.finish_reason,
            })  # fmt: skip
        return {
            "request_id": out.request_id,
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens,
            "finished": out.finished,
            "choices": choices,
        }

    def _logprobs(self, c: CompletionOutput, start: int) -> list[dict[str, Any]] | None:
        """One entry per new token: its text, logprob and the top alternatives."""
        if c.logprobs is None:
            return None
        entries = []
        for tok, lps in zip(c.token_ids[start:], c.logprobs[start:], strict=True):
            top = sorted(lps.items(), key=lambda kv: -kv[1])
            entries.append({
                "token": self._piece(tok), "logprob": lps.get(tok, float("-inf")),
                "top": [(self._piece(t), lp) for t, lp in top],  # best first
            })  # fmt: skip
        return entries

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


EngineDeployment: Any = serve.deployment(name="engine")(EngineReplica)
