"""One request through the API process: place it on a core, stream its deltas, and
resume it elsewhere when its core dies.

``stream(cores, req, prefix)`` yields the request's deltas (``cluster.replica``
documents them) until the last one (``finished``, or ``error`` for bad input: HTTP
400). ``PoolFull`` (HTTP 429) when the core chosen refused a new request;
``EngineGone`` (HTTP 503) when no core could take it within ``PLACE_TIMEOUT_S``.

Failover: when the request's core dies (its link breaks or goes silent) or its engine
does (a ``gone`` delta), the request goes on on another core (the failed ones
avoided) from its prompt plus the tokens the client was sent (``resume``; the new
engine recomputes their K/V and counts them as output), so the client's stream goes
on with no gap and no repeat, and a greedy (or seeded) request's output equals an
undisturbed run. The deltas of the new core carry the KV accounting of the failed
attempts in ``kv["earlier"]``. At most ``MAX_FAILOVERS`` times; each waits up to
``FAILOVER_TIMEOUT_S`` for a core to take it (Serve replaces the dead replica, and
this process attaches to it), then ``EngineGone``. A request with ``n`` > 1 fails
over only before any sample was sent. Leaving early (client gone) aborts the request
on its core, whose blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.api.cores import Cores
from cluster.core.client import CoreLink, DeltaQueue
from cluster.core.messages import Choice, Delta, EngineGone, PoolFull, Request

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 3
FAILOVER_TIMEOUT_S = 30.0
PLACE_TIMEOUT_S = 60.0  # a new request waits this long for a core (none attached yet)
RETRY_S = 0.1


async def stream(cores: Cores, req: Request, prefix: Sequence[int] = (),
                 max_failovers: int = MAX_FAILOVERS,
                 failover_timeout_s: float = FAILOVER_TIMEOUT_S,
                 place_timeout_s: float = PLACE_TIMEOUT_S,
                 api_id: str = "") -> AsyncIterator[Delta]:  # fmt: skip
    """See the module doc (``ServeConfig`` documents the limits). ``api_id``: this API
    process, named in the last delta's ``kv["api"]``."""
    rid = str(req["request_id"])
    opened = time.monotonic()
    first_delta: float | None = None
    tokens: list[int] = []  # what the client has been sent (n = 1) ...
    text = 0  # ... and the length of its text
    failed: list[str] = []
    earlier: list[dict[str, Any]] = []  # the KV accounting of the attempts that failed
    kv: dict[str, Any] | None = None
    n = int(getattr(req.get("params"), "n", 1))
    while True:
        attempt: Request = req if not failed else {**req, "resume": list(tokens),
                                                   "resume_text": text}  # fmt: skip
        timeout = failover_timeout_s if failed else place_timeout_s
        link, queue = await _place(cores, attempt, prefix, failed, timeout)
        placed = time.monotonic()
        try:  # (``_place`` counted the request in ``link.live``)
            async for item in _items(link, rid, queue):
                if first_delta is None and item.get("choices"):
                    first_delta = time.monotonic()
                if "kv" in item:
                    kv = item["kv"]
                    if earlier:
                        item = {**item, "kv": {**item["kv"], "earlier": earlier}}
                    if _last(item):
                        item = {**item, "kv": {**item["kv"], "api": api_id}}
                        if first_delta is not None:
                            item = _with_api_timing(item, req, opened, placed, first_delta)
                choices = item.get("choices", ())  # none on an error item
                if n == 1:
                    for c in choices:
                        tokens.extend(c["token_ids"])
                        text += len(c["text"])
                elif choices:
                    n = -1  # samples went out: n > 1 cannot resume
                yield item
            return
        except EngineGone as e:
            if n < 0 or len(failed) >= max_failovers:
                raise
            failed.append(link.instance_id)
            earlier = [*earlier, kv or {"instance": link.instance_id}]
            kv = None
            logger.warning("request %s: %s; resuming after %d tokens elsewhere", rid, e,
                           len(tokens))  # fmt: skip
        finally:
            link.live -= 1


async def _place(cores: Cores, req: Request, prefix: Sequence[int], failed: list[str],
                 timeout_s: float) -> tuple[CoreLink, DeltaQueue]:  # fmt: skip
    """Sends ``req`` to a core; the link and the request's queue. A first attempt raises
    ``PoolFull`` when the core chosen refuses it; cores that fail are avoided and the
    next one tried until ``timeout_s`` passes (``EngineGone``)."""
    deadline = time.monotonic() + timeout_s
    avoid = list(failed)
    rid = str(req["request_id"])
    blocks = cores.blocks_for(req)
    last = "no engine core is attached to this API process"
    while True:
        got = cores.place(rid, blocks, prefix, avoid)
        if got is not None:
            link, placed = got
            link.live += 1
            taken = False
            try:
                queue = await link.add(req)
                taken = True
                return link, queue
            except PoolFull as e:
                if not failed:
                    raise
                last = str(e)
            except EngineGone as e:
                avoid.append(link.instance_id)
                last = str(e)
            finally:
                cores.settle(placed, taken)
                if not taken:
                    link.live -= 1
        elif cores.alive():
            last = "only engine instances that failed this request are up"
        if time.monotonic() >= deadline:
            raise EngineGone(f"no engine instance could take the request within {timeout_s:g} s "
                             f"({last}); retry shortly")  # fmt: skip
        await asyncio.sleep(RETRY_S)


async def _items(link: CoreLink, rid: str, queue: DeltaQueue) -> AsyncIterator[Delta]:
    """One attempt's deltas until its last; ``EngineGone`` when its core dies. Leaving
    early aborts the request on the core."""
    done = False
    try:
        while True:
            item = await queue.get()
            while isinstance(item, dict) and not _last(item):  # fell behind: merge
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                item = nxt if isinstance(nxt, BaseException) else merge(item, nxt)
            if isinstance(item, BaseException):
                done = True  # the core is gone: nothing there to abort
                raise item
            if "gone" in item:
                done = True
                raise EngineGone(f"engine instance {link.instance_id}: {item['gone']}")
            done = _last(item)
            yield item
            if done:
                return
    finally:
        if done:
            link.forget(rid)
        else:
            link.abort(rid)


def _with_api_timing(item: Delta, req: Request, opened: float, placed: float,
                     first: float) -> Delta:  # fmt: skip
    """``item`` with the API process's share of its request's first-token time in
    ``kv["timing_ms"]`` (ms from the request's opening here): ``api_place`` until its
    core took it, ``api_first_delta`` until its first delta arrived; ``api_parse`` from
    the HTTP call reaching the app to the opening (routing, body parsing)."""
    timing = {**item["kv"].get("timing_ms", {}),
              "api_place": round((placed - opened) * 1e3, 3),
              "api_first_delta": round((first - opened) * 1e3, 3)}  # fmt: skip
    api_at = req.get("api_arrived_at")
    if api_at is not None:
        timing["api_parse"] = round((opened - api_at) * 1e3, 3)
    return {**item, "kv": {**item["kv"], "timing_ms": timing}}


def _last(item: Delta) -> bool:
    return bool(item.get("finished")) or "error" in item or "gone" in item


def merge(a: Delta, b: Delta) -> Delta:
    """Two consecutive deltas of one request as one (texts, tokens, logprobs joined);
    ``a`` is not the last."""
    if "error" in b or "gone" in b:
        return b
    choices: dict[int, Choice] = {c["index"]: {**c} for c in a["choices"]}
    for c in b["choices"]:
        prev = choices.get(c["index"])
        if prev is None:
            choices[c["index"]] = {**c}
            continue
        prev["text"] += c["text"]
        prev["token_ids"] = [*prev["token_ids"], *c["token_ids"]]
        if prev["logprobs"] is not None or c["logprobs"] is not None:
            prev["logprobs"] = [*(prev["logprobs"] or []), *(c["logprobs"] or [])]
        prev["finish_reason"] = c["finish_reason"] or prev["finish_reason"]
    return {**b, "choices": [choices[i] for i in sorted(choices)]}
