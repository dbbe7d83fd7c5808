"""One engine instance behind asyncio: the step loop on its own thread.

``LLMEngine`` is synchronous and not thread-safe, so one thread owns it: it takes
commands (add, abort) from a queue, steps while any request is unfinished, and hands
each request's outputs to the asyncio loop that asked for them. Callers see:

- ``generate(...)``: an async iterator of cumulative ``RequestOutput``s, the last one
  ``finished``; a consumer slower than the steps skips to the newest output. Bad input raises ``ValueError`` (naming the problem) before anything is
  queued. Leaving the iteration early (client gone, ``aclose``, cancellation) aborts
  the request, and its blocks return to the pool.
- If a step raises (a worker group that died, say), the engine is dead: every open
  stream raises ``EngineDeadError`` and new requests are refused with it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.core.handoff import Stream, consume, hand_over, post, set_exception, set_result
from cluster.relay import engine_stats
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def executor_for(args: EngineArgs) -> Any:
    """The executor class a serving core hands its engine: the Ray worker group above
    TP 1 (unless the args name another), else None (the engine's own choice)."""
    if args.tensor_parallel_size > 1 and args.distributed_executor_backend in (None, "ray"):
        from workers.group import RayExecutor

        return RayExecutor
    return None


class EngineDeadError(RuntimeError):
    """The engine's step loop failed; this instance serves nothing more."""


class AsyncEngine:
    def __init__(self, args: EngineArgs, step_delay_s: float = 0.0) -> None:
        """``step_delay_s``: a sleep before each step (fault injection: streams live long
        enough for a test to kill something under them)."""
        self.engine = LLMEngine(args, executor_for(args))
        self.step_delay_s = step_delay_s
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}
        self._streams_pending: dict[str, Stream] = {}  # reserved, K/V not yet in
        self._dead: EngineDeadError | None = None
        self._stop = threading.Event()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    # --- asyncio side ------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        with self._id_lock:
            self._next_id += 1
            return f"{prefix}-{self._next_id}"

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        resume: Sequence[int] = (),
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """The request's outputs (cumulative) until it finishes; ``resume``: output tokens
        it produced on an instance that died (``LLMEngine.add_request``)."""
        rid = request_id or self.new_request_id()
        stream, added = self._submit("add", prompt, params, rid, tuple(resume))
        try:
            await added  # ValueError for bad input: nothing was queued
        except asyncio.CancelledError:  # left before the engine took it: abort it there
            self._cmds.put(("abort", rid))
            raise
        async for item in self._consume(rid, stream):
            yield item

    def _submit(self, kind: str, *args: Any) -> tuple[Stream, asyncio.Future[Any]]:
        """Queues ``(kind, *args, stream, added)`` for the engine thread: a new stream
        for the request's outputs, and the future it settles once it took the command."""
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        stream, added = Stream(loop, asyncio.Queue()), loop.create_future()
        self._cmds.put((kind, *args, stream, added))
        return stream, added

    def _consume(self, rid: str, stream: Stream) -> AsyncIterator[RequestOutput]:
        """The outputs of a registered request until it finishes; leaving early aborts it."""
        return consume(stream.queue, lambda: self._cmds.put(("abort", rid)))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    # --- disaggregated handoff (see docs/disaggregation.md) ------------------------------
    async def prefill(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestOutput:
        """Prefill-only: the finished output with the first token and ``kv_block_ids``;
        the blocks stay held until ``release_kv``. ValueError for bad input."""
        stream, added = self._submit("add_prefill", prompt, params, request_id)
        await added
        last: RequestOutput | None = None
        async for out in self._consume(request_id, stream):
            last = out
        assert last is not None and last.finished
        return last

    def release_kv_nowait(self, request_id: str) -> None:
        """Frees the blocks a prefill-only request kept (they stay as prefix cache)."""
        self._cmds.put(("release_kv", request_id))

    async def reserve(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> list[int] | None:
        """Decode side: registers a request whose prompt K/V will arrive and returns the
        block ids to write it into, or None (no room: nothing registered). Follow with
        ``transferred`` (the blocks are written) or ``abort``."""
        _, added = self._submit("reserve", prompt, params, request_id)
        blocks: list[int] | None = await added
        return blocks

    async def transferred(self, request_id: str, first_token: int) -> AsyncIterator[RequestOutput]:
        """The reserved request's blocks hold its prompt's K/V: it decodes from the prefill
        side's ``first_token``; yields its outputs like ``generate``."""
        stream = self._streams_pending.pop(request_id, None)
        if stream is None:
            raise self._dead or RuntimeError(f"request {request_id} is not waiting for its K/V")
        self._cmds.put(("transferred", request_id, first_token, stream))
        async for item in self._consume(request_id, stream):
            yield item

    async def reset_prefix_cache(self) -> int:
        """``LLMEngine.reset_prefix_cache``, between two steps on the engine thread."""
        if self._dead is not None:
            raise self._dead
        done = asyncio.get_running_loop().create_future()
        self._cmds.put(("reset", done))
        return int(await done)

    def prefix_hashes(self, limit: int) -> list[bytes]:
        """The newest ``limit`` blocks of the prefix cache (read without a lock: a list
        copy of the pool's hashes)."""
        return self.engine.prefix_hashes(limit)

    def kv_caches(self) -> list[Any]:
        """This instance's (rank 0's) per-layer KV cache tensors, for the transfer."""
        return list(self.engine.runner.kv_caches)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` if the step loop failed (or its worker group did)."""
        if self._dead is not None:
            raise self._dead
        self.engine.executor.check_health()

    def shutdown(self) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # --- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                self._drain(block)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:
            self._die(e)

    def _drain(self, block: bool) -> None:
        """Applies every queued command; waits for one first when idle."""
        while True:
            try:
                cmd = self._cmds.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                return
            block = False
            kind = cmd[0]
            if kind == "add":
                _, prompt, params, rid, resume, stream, added = cmd
                try:
                    self.engine.add_request(prompt, params, rid, resume)
                except Exception as e:  # bad input: the caller gets it, nothing queued
                    post(stream.loop, set_exception, added, e)
                    continue
                self._streams[rid] = stream
                post(stream.loop, set_result, added, rid)
            elif kind in ("add_prefill", "reserve"):
                _, prompt, params, rid, stream, added = cmd
                try:
                    if kind == "add_prefill":
                        result: Any = self.engine.add_prefill_request(prompt, params, rid)
                    else:
                        result = self.engine.add_transferred_request(prompt, params, rid)
                except Exception as e:
                    post(stream.loop, set_exception, added, e)
                    continue
                if kind == "add_prefill":
                    self._streams[rid] = stream
                elif result is not None:
                    self._streams_pending[rid] = stream
                post(stream.loop, set_result, added, result)
            elif kind == "transferred":
                _, rid, token, stream = cmd
                self._streams[rid] = stream
                out = self.engine.finish_transfer(rid, token)
                self._publish([out])
            elif kind == "reset":
                post(cmd[1].get_loop(), set_result, cmd[1], self.engine.reset_prefix_cache())
            elif kind == "release_kv":
                self.engine.release_kv(cmd[1])
            elif kind == "abort":
                rid = cmd[1]
                pending = self._streams_pending.pop(rid, None)
                if self._streams.pop(rid, None) is not None or pending is not None:
                    self.engine.abort(rid)
                # A prefill-only request that finished as its caller left still holds
                # its blocks for a transfer that will not come: free them.
                self.engine.release_kv(rid)

    def _step(self) -> None:
        if self.step_delay_s:  # fault injection (tests): slow steps, long-lived streams
            time.sleep(self.step_delay_s)
        outputs = self.engine.step()
        self.num_steps += 1
        self._publish(outputs)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's outputs to their streams (``hand_over``)."""
        items: list[tuple[Stream, Any]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            items.append((stream, out))
        hand_over(items)

    def _die(self, err: BaseException) -> None:
        logger.exception("engine step loop failed; the instance is dead")
        self._dead = EngineDeadError(f"engine failed: {type(err).__name__}: {err}")
        for stream in [*self._streams.values(), *self._streams_pending.values()]:
            post(stream.loop, stream.queue.put_nowait, self._dead)
        self._streams.clear()
        self._streams_pending.clear()
        while True:  # refuse whatever was queued meanwhile
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] in ("add", "add_prefill", "reserve", "reset"):
                fut = cmd[-1]  # the caller's future, last in every such command
                post(fut.get_loop(), set_exception, fut, self._dead)

    # --- figures ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot for status tables and metrics (read without a lock: counters only)."""
        return engine_stats(self.engine, self.num_steps, self._dead is not None)
