"""From an engine's cumulative ``RequestOutput`` stream to the front's deltas.

What an engine replica (``cluster.replica``) and an API process (``cluster.api``) both
do with a request's outputs: each output becomes one plain-dict delta holding only what
is new since the previous one (``cluster.replica`` documents the shape), the request's
metrics are recorded (``RequestTimer``), and its first delta with tokens carries where
its first token's time went (``kv["timing_ms"]``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from cluster.core.messages import Choice, Delta, Request
from cluster.metrics import RequestTimer
from engine.kv_budget import demand_blocks
from engine.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


def engine_info(model: str, role: str, engine: Any) -> dict[str, Any]:
    """What a front says of the engine it serves (``EngineReplica.info``): the model,
    its context, and how ``engine`` (an ``LLMEngine`` or ``EngineView``) hashes prefix
    blocks (the router's ``cluster.placement.affinity.PromptHasher`` hashes prompts the same way)."""
    return {"model": model, "max_model_len": engine.scheduler_config.max_model_len,
            "role": role, "model_dir": str(engine.model_dir),
            "block_size": engine.args.block_size, "prefix_key": engine.prefix_key.hex()}  # fmt: skip


def engine_stats(eng: LLMEngine, num_steps: int, dead: bool) -> dict[str, Any]:
    """An engine's figures (``kvserve status``, metrics); ``kv_demand``: blocks held plus
    ``projected_blocks`` (``engine.kv_budget``), over all."""
    sched = eng.scheduler
    pool = eng.kv.pool if eng.kv is not None else None
    projected = sched.projected_blocks()  # what projected admission keeps free
    blocks: dict[str, float] = dict.fromkeys(("num_blocks", "free_blocks", "host_blocks",
                                              "host_cached_blocks", "kv_demand"), 0)  # fmt: skip
    if pool is not None:
        blocks = {"num_blocks": pool.num_blocks, "free_blocks": pool.num_free_blocks,
                  "host_blocks": pool.num_host_blocks,
                  "host_cached_blocks": pool.num_host_cached_blocks,
                  "kv_demand": demand_blocks(pool.num_blocks, pool.num_free_blocks, projected)
                  / pool.num_blocks}  # fmt: skip
    return {"time": time.time(), "tp": eng.args.tensor_parallel_size,
            "block_size": eng.args.block_size, "running": len(sched.running),
            "waiting": len(sched.waiting), **blocks, "projected_blocks": projected,
            "kv_usage": eng.kv_usage(), "prefix_cache_queries": sched.prefix_cache_queries,
            "prefix_cache_hits": sched.prefix_cache_hits,
            "prefix_cache_host_hits": sched.prefix_cache_host_hits,
            "prompt_tokens_computed": sched.prompt_tokens_computed,
            "preemptions": sched.num_preemptions, "steps": num_steps, "dead": dead}  # fmt: skip


def prompt_of(req: Request, engine: Any) -> str | list[int]:
    """The prompt ``req`` names: token ids tokenized upstream (the router's affinity),
    chat messages rendered with ``engine``'s template, or its text."""
    if req.get("prompt_ids") is not None:
        return [int(t) for t in req["prompt_ids"]]
    if req.get("messages") is not None:
        return str(engine.apply_chat_template(req["messages"]))
    return req["prompt"]  # type: ignore[no-any-return]


async def relay(
    stream: AsyncIterator[RequestOutput], first: RequestOutput, req: Request,
    kv: dict[str, Any], timer: RequestTimer, tokenizer: Any, stream_interval_s: float = 0.0,
    sent: dict[int, tuple[int, int]] | None = None,
) -> AsyncGenerator[Delta, None]:  # fmt: skip
    """The deltas of ``stream`` (whose first output, ``first``, was read already), until
    the finished one. ``sent``: per sample, the (text, tokens) the client has already (a
    resumed request). ``stream_interval_s``: least time between two deltas after the
    first token (outputs pile up meanwhile; the newest wins). Closing this generator
    closes ``stream`` (the engine aborts the request)."""
    sent = {} if sent is None else sent
    out: RequestOutput | None = first
    submitted = req.get("submitted_at")
    try:
        while out is not None:
            delta = delta_of(out, sent, tokenizer)
            delta["kv"] = kv
            now = time.monotonic()
            if submitted is not None and timer.last is None and delta["choices"]:
                kv["timing_ms"] = first_token_timing(out, submitted, now)
            timer.tokens(sum(len(c["token_ids"]) for c in delta["choices"]), now)
            if out.finished:
                timer.finish(now, delta["prompt_tokens"])
            if delta["choices"] or out.finished:
                yield delta
            if out.finished:
                break
            if stream_interval_s and timer.last is not None:
                await asyncio.sleep(stream_interval_s)
            out = await anext(stream, None)
    finally:  # left early (aclose, cancelled): the engine aborts the request
        await stream.aclose()  # type: ignore[attr-defined]


def delta_of(out: RequestOutput, sent: dict[int, tuple[int, int]], tokenizer: Any) -> Delta:
    """``out`` as a delta from what ``sent`` holds (per sample: text length, tokens),
    which it updates; samples with nothing new and not finished are left out."""
    choices: list[Choice] = []
    for c in out.outputs:
        text_at, tok_at = sent.get(c.index, (0, 0))
        text = c.text[text_at:]
        tokens = c.token_ids[tok_at:]
        if not text and not tokens and not c.finished:
            continue
        sent[c.index] = (len(c.text), len(c.token_ids))
        choices.append({
            "index": c.index, "text": text, "token_ids": tokens,
            "logprobs": _logprobs(c, tok_at, tokenizer), "finish_reason": c.finish_reason,
        })  # fmt: skip
    return {
        "request_id": out.request_id,
        "prompt_tokens": len(out.prompt_token_ids),
        "cached_tokens": out.num_cached_tokens,
        "host_cached_tokens": out.num_host_cached_tokens,
        "finished": out.finished,
        "choices": choices,
    }


def _logprobs(c: CompletionOutput, start: int, tokenizer: Any) -> list[dict[str, Any]] | None:
    """One entry per new token: its text, logprob and the top alternatives."""
    if c.logprobs is None:
        return None

    def piece(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    entries = []
    for tok, lps in zip(c.token_ids[start:], c.logprobs[start:], strict=True):
        top = sorted(lps.items(), key=lambda kv: -kv[1])
        entries.append({
            "token": piece(tok), "logprob": lps.get(tok, float("-inf")),
            "top": [(piece(t), lp) for t, lp in top],  # best first
        })  # fmt: skip
    return entries


def first_token_timing(out: RequestOutput, submitted: float, now: float) -> dict[str, float]:
    """Where a request's first token spent its time in the engine replica (ms; see
    ``cluster.api.http._kv_extension``): ``replica_queue`` from its arrival
    (``submitted``) until the engine took it, ``engine_ttft`` from then to the first
    token, ``replica_first_delta`` until its first delta left. ``replica_received_at``
    is the arrival on this host's ``time.monotonic()`` clock (ms), so that a client on
    the same host can split what lies outside the replica."""
    m = out.metrics
    arrival = m.get("arrival", submitted)
    timing = {"replica_queue": (arrival - submitted) * 1e3,
              "replica_first_delta": (now - submitted) * 1e3,
              "replica_received_at": submitted * 1e3}  # fmt: skip
    if "ttft_s" in m:
        timing["engine_ttft"] = m["ttft_s"] * 1e3
    return {k: round(v, 3) for k, v in timing.items()}
