"""One stream per (router, engine replica) pair instead of one per request.

Every Serve streaming item costs the replica's process an object and a message; a replica
running 64 streams at a hundred steps a second would send thousands a second, and that
work shares a process (and its GIL) with the engine's step loop. So the router and each
engine replica it uses keep one long-lived stream between them, and each item on it is a
list: every delta the replica produced for that router's requests since the last item
(normally one engine step's worth).

Replica side (``Outbox``): ``EngineReplica.submit`` starts a request and files its deltas
into the outbox of the router that sent it; ``EngineReplica.subscribe`` hands the outbox
out as lists. Router side (``StreamMux``): ``open(req)`` submits the request, subscribes to
the replica that took it (once per replica) and yields that request's deltas.

Contracts
- A request's deltas arrive in order and end with one that is ``finished`` or carries
  ``error`` (bad input, HTTP 400). ``EngineGone`` is raised when the replica's engine
  failed or its stream broke (HTTP 503); ``PoolFull`` when the replica refused a new
  request because its queue is full (HTTP 429).
- Leaving ``open``'s iteration early (client gone, cancellation) cancels the request on
  its replica, which aborts it in the engine so its blocks return to the pool. A router
  that goes away ends its streams, and the replica aborts every request it sent.
- Failover: when a request's replica dies (its stream breaks) or its engine does (a
  ``gone`` item), the request goes on on another replica (``avoid`` keeps the dead one
  out) from its prompt plus the tokens the client was sent (``resume``; the new engine
  recomputes their K/V and counts them as output), so the client's stream goes on with
  no gap and no repeat, and a greedy (or seeded) request's output equals an undisturbed
  run. The new instance's deltas carry the KV accounting of the failed attempts in
  ``kv["earlier"]``. At most ``MAX_FAILOVERS`` times; each waits up to
  ``FAILOVER_TIMEOUT_S`` for a replica to take it (Serve replaces the dead one), then
  ``EngineGone`` (HTTP 503, retriable). A request with ``n`` > 1 fails over only
  before any sample was sent.
- A replica ends a router's stream when it has been idle ``IDLE_CLOSE_S`` with no
  request of that router left (a draining replica can stop; Serve counts an open stream
  as an ongoing request); the router reopens it when it has requests there again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger(__name__)

# Requests this process has live on each replica (its unique id): what the request
# router (``cluster.request_router``, same process) places new requests by.
LIVE: Counter[str] = Counter()

# A replica drops a router's requests when the router has not subscribed this long after
# its first submit (it died between the two calls).
SUBSCRIBE_GRACE_S = 60.0
# A replica ends a router's stream once it has had nothing for that router this long (so
# that a replica can drain and stop, and a dead router's stream ends); the router opens
# a new one when it next has requests there.
IDLE_CLOSE_S = 2.0
CANCEL_TIMEOUT_S = 30.0
# A request whose instance dies goes on elsewhere at most this many times, and waits at
# most this long for an instance to take it each time (then: EngineGone, HTTP 503).
MAX_FAILOVERS = int(os.environ.get("KVSERVE_MAX_FAILOVERS", "3"))
FAILOVER_TIMEOUT_S = float(os.environ.get("KVSERVE_FAILOVER_TIMEOUT_S", "30"))
# A new request waits at most this long for an instance to take it (none running: Serve
# would queue the call until one starts), then EngineGone (HTTP 503).
PLACE_TIMEOUT_S = float(os.environ.get("KVSERVE_PLACE_TIMEOUT_S", "60"))


class EngineGone(RuntimeError):
    """The replica serving a request failed, or the stream to it broke."""


class PoolFull(RuntimeError):
    """The replica refused a new request: its queue is full (retry shortly)."""


# --- replica side ---------------------------------------------------------------------------
class Outbox:
    """The deltas one replica owes one router, taken as lists in order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.created = time.monotonic()
        self.subscribed = False

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Everything filed since the last take; waits for at least one item (at most
        ``timeout`` seconds: ``TimeoutError``)."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        await asyncio.sleep(0)  # let the rest of this step's requests file theirs
        items, self.items = self.items, []
        self.ready.clear()
        return items

    def cancel_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()


async def pump(rid: str, source: AsyncIterator[dict[str, Any]], box: Outbox) -> None:
    """Files ``source``'s deltas (one request) into ``box``; an exception becomes a final
    ``{"request_id", "gone": message}`` item. Cancelling the task closes ``source``."""
    try:
        async for delta in source:
            box.put(delta)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        box.put({"request_id": rid, "gone": f"{type(e).__name__}: {e}"})
    finally:
        box.tasks.pop(rid, None)
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]


# --- router side ----------------------------------------------------------------------------
class StreamMux:
    """The router's end: requests over one stream per engine replica (see module doc)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.id = f"router-{uuid.uuid4().hex[:12]}"
        self._queues: dict[str, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._where: dict[str, str] = {}
        self._subs: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_instance: dict[str, str] = {}
        self._placed_at: dict[str, float] = {}  # when the last attempt's submit returned
        self.failovers = 0  # requests moved off an instance that died

    async def open(self, req: dict[str, Any], prefix: list[int] | None = None
                   ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """``req``'s deltas, failing over when its instance dies (see the module doc).
        ``prefix``: its prompt's leading block hashes (``cluster.affinity``), for the
        request router."""
        rid = str(req["request_id"])
        opened = time.monotonic()
        first_delta: float | None = None
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        tokens: list[int] = []  # what the client has been sent (n = 1) ...
        text = 0  # ... and the length of its text
        failed: list[str] = []
        earlier: list[dict[str, Any]] = []  # the KV accounting of the attempts that failed
        kv: dict[str, Any] | None = None
        n = int(getattr(req.get("params"), "n", 1))
        try:
            while True:
                attempt = req if not failed else {**req, "resume": list(tokens),
                                                  "resume_text": text}  # fmt: skip
                try:
                    async for item in self._run(rid, attempt, queue, failed, prefix):
                        if first_delta is None and item.get("choices"):
                            first_delta = time.monotonic()
                        if "kv" in item:
                            kv = item["kv"]
                            if earlier:
                                item = {**item, "kv": {**item["kv"], "earlier": earlier}}
                            if _last(item) and first_delta is not None:
                                placed = self._placed_at.get(rid, opened)
                                item = _with_router_timing(item, opened, placed, first_delta)
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
                    where = self._last_instance.pop(rid, None)
                    if n < 0 or len(failed) >= MAX_FAILOVERS or where is None:
                        raise
                    failed.append(where)
                    earlier = [*earlier, kv or {"instance": where}]
                    kv = None
                    self.failovers += 1
                    logger.warning("request %s: %s; resuming after %d tokens elsewhere", rid, e,
                                   len(tokens))  # fmt: skip
        finally:
            self._queues.pop(rid, None)
            self._last_instance.pop(rid, None)
            self._placed_at.pop(rid, None)

    async def _place(self, req: dict[str, Any], failed: list[str],
                     prefix: list[int] | None = None) -> str:  # fmt: skip
        """Submits ``req``: the instance that took it. A first attempt raises what the
        pool says (``PoolFull``, a dead engine); a failover retries, away from the
        instances that failed, until one takes it or ``FAILOVER_TIMEOUT_S`` passes
        (``EngineGone``: no capacity left; the client may retry)."""
        if not failed:
            try:
                placed = await asyncio.wait_for(
                    self.handle.submit.remote(req, self.id, prefix=prefix), PLACE_TIMEOUT_S
                )
            except TimeoutError:
                raise EngineGone(
                    f"no engine instance took the request within "
                    f"{PLACE_TIMEOUT_S:g} s; retry shortly"
                ) from None
            if placed.get("full"):
                raise PoolFull(placed["full"])
            return str(placed["instance"])
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        delay = 0.1
        last: BaseException | str = "no engine instance answered"
        while (left := deadline - time.monotonic()) > 0:
            try:
                placed = await asyncio.wait_for(
                    self.handle.submit.remote(req, self.id, avoid=failed, prefix=prefix), left
                )
                if placed.get("full"):
                    last = str(placed["full"])
                elif str(placed["instance"]) not in failed:
                    return str(placed["instance"])
                else:  # only the failed instance is left and it took it: not again
                    last = f"engine instance {placed['instance']} failed this request before"
                    await self.handle.cancel.remote(req["request_id"], self.id,
                                                    target=placed["instance"])  # fmt: skip
            except TimeoutError:
                break
            except Exception as e:  # a dead replica, or one whose engine died
                last = e
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        raise EngineGone(f"no engine instance could take the request after {len(failed)} "
                         f"failed ({last}); retry shortly")  # fmt: skip

    async def _run(self, rid: str, req: dict[str, Any],
                   queue: asyncio.Queue[dict[str, Any] | BaseException],
                   failed: list[str], prefix: list[int] | None = None
                   ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """One attempt: place ``req`` and yield its deltas until its last; ``EngineGone``
        when its instance dies (``_last_instance[rid]`` names it)."""
        while not queue.empty():  # what the failed attempt left (its instance's error)
            queue.get_nowait()
        instance = await self._place(req, failed, prefix)
        self._placed_at[rid] = time.monotonic()
        self._where[rid] = instance
        self._last_instance[rid] = instance
        LIVE[instance] += 1
        if instance not in self._subs:
            self._subs[instance] = asyncio.ensure_future(self._subscribe(instance))
        done = False
        try:
            while True:
                item = await queue.get()
                while isinstance(item, dict) and not _last(item):  # fell behind: merge
                    try:
                        nxt = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if isinstance(nxt, BaseException):
                        item = nxt
                        break
                    item = merge(item, nxt)
                if isinstance(item, BaseException):
                    done = True  # the replica is gone: nothing there to cancel
                    raise item
                if "gone" in item:
                    done = True
                    raise EngineGone(f"engine instance {instance}: {item['gone']}")
                done = _last(item)
                yield item
                if done:
                    return
        finally:
            self._where.pop(rid, None)
            LIVE[instance] -= 1
            if LIVE[instance] <= 0:
                del LIVE[instance]
            if not done:
                self._cancel(rid, instance)

    def _cancel(self, rid: str, instance: str) -> None:
        """Tells ``instance`` to drop ``rid``, from a task of its own with an empty
        context: the caller is often the request's own task being cancelled, and Serve
        cancels the calls a cancelled request made (it finds them through contextvars)."""
        task = asyncio.get_running_loop().create_task(
            self._send_cancel(rid, instance), context=contextvars.Context()
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_cancel(self, rid: str, instance: str) -> None:
        try:
            await asyncio.wait_for(self.handle.cancel.remote(rid, self.id, target=instance),
                                   CANCEL_TIMEOUT_S)  # fmt: skip
        except Exception as e:  # the instance is gone: so is the request
            logger.warning("cancel of %s on engine instance %s failed: %s", rid, instance, e)

    async def _subscribe(self, instance: str) -> None:
        err: BaseException
        while True:
            try:
                gen = self.handle.options(stream=True).subscribe.remote(self.id, target=instance)
                async for batch in gen:
                    for delta in batch:
                        queue = self._queues.get(delta["request_id"])
                        if queue is not None:
                            queue.put_nowait(delta)
            except Exception as e:
                logger.warning("stream from engine instance %s broke: %s", instance, e)
                err = EngineGone(f"engine instance {instance} is gone: {type(e).__name__}")
                break
            # The replica closed an idle stream: done unless requests went there since
            # (checked and dropped in one step of the loop, so ``open`` sees either).
            if not any(where == instance for where in self._where.values()):
                self._subs.pop(instance, None)
                return
        self._subs.pop(instance, None)
        for rid, where in list(self._where.items()):
            if where == instance and rid in self._queues:
                self._queues[rid].put_nowait(err)


def _with_router_timing(
    item: dict[str, Any], opened: float, placed: float, first: float
) -> dict[str, Any]:
    """``item`` with the router's share of its request's first-token time in
    ``kv["timing_ms"]`` (ms from ``open``): ``router_place`` until the replica's
    ``submit`` answered, ``router_first_delta`` until the first delta arrived."""
    timing = {**item["kv"].get("timing_ms", {}),
              "router_place": round((placed - opened) * 1e3, 3),
              "router_first_delta": round((first - opened) * 1e3, 3)}  # fmt: skip
    return {**item, "kv": {**item["kv"], "timing_ms": timing}}


def _last(item: dict[str, Any]) -> bool:
    return bool(item.get("finished")) or "error" in item or "gone" in item


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive deltas of one request as one (texts, tokens, logprobs joined);
    ``a`` is not the last."""
    if "error" in b or "gone" in b:
        return b
    choices = {c["index"]: dict(c) for c in a["choices"]}
    for c in b["choices"]:
        prev = choices.get(c["index"])
        if prev is None:
            choices[c["index"]] = dict(c)
            continue
        prev["text"] += c["text"]
        prev["token_ids"] = [*prev["token_ids"], *c["token_ids"]]
        if prev.get("logprobs") is not None or c.get("logprobs") is not None:
            prev["logprobs"] = [*(prev.get("logprobs") or []), *(c.get("logprobs") or [])]
        prev["finish_reason"] = c["finish_reason"] or prev["finish_reason"]
    return {**b, "choices": [choices[i] for i in sorted(choices)]}
