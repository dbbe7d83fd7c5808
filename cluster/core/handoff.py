"""Handing outputs from a thread (the engine's step loop) to the asyncio loops that wait
for them: each request's ``Stream`` is its loop and queue; ``hand_over`` posts a step's
outputs with one thread-safe call per loop; ``consume`` reads a request's queue until
its finished output (leaving early calls back, which aborts the request)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.outputs import RequestOutput


@dataclass(slots=True)
class Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


async def consume(
    q: asyncio.Queue[RequestOutput | BaseException], on_leave: Callable[[], None]
) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its queue until the finished one; an exception in the
    queue is raised. Leaving before the finished output (client gone, ``aclose``,
    cancellation) calls ``on_leave`` (it aborts the request)."""
    finished = False
    try:
        while True:
            item = await q.get()
            # Outputs are cumulative: a consumer that fell behind gets the newest one
            # only (one message for several steps, no added latency when it keeps up).
            while not isinstance(item, BaseException) and not item.finished:
                try:
                    item = q.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:
            on_leave()


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on ``loop`` from another thread; nothing if that loop is closed (its
    callers are gone: the engine goes on for everyone else)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def hand_over(items: list[tuple[Stream, Any]]) -> None:
    """Puts each output in its stream's queue, from the engine's thread: one thread-safe
    call per event loop (each wakes its loop through the self-pipe), not one per stream;
    in the order given, which is the order the streams' tasks wake in."""
    batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
    for stream, out in items:
        batches.setdefault(stream.loop, []).append((stream.queue, out))
    for loop, batch in batches.items():
        post(loop, _deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, out in batch:
        q.put_nowait(out)


def set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def set_exception(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
