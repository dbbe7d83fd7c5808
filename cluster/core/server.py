"""The engine core's side of its links: API processes attach over TCP and send requests.

Runs on the engine replica's event loop (``asyncio.start_server`` on a socket bound at
construction). Each attached client has an ``Outbox``: a request it adds runs as a task
(``pump``) that files the request's deltas there, and one writer task sends the outbox
as one message per batch (normally one engine step's worth for every request of that
client), with the core's figures, and the prefix-cache hashes every ``HASHES_EVERY_S``.
An idle client still gets a message every ``REPORT_EVERY_S`` (its link's heartbeat).

The messages are ``cluster.core.messages``'s, on ``cluster.core.transport`` ends: a TCP
socket bound at construction (``address``), and ``local_address`` for clients in this
process.

A request belongs to the client that added it. A client whose link closes, breaks or
sends garbage has every request of its own aborted (the blocks return to the pool);
the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from cluster.core import transport
from cluster.core.messages import (
    GONE,
    Abort,
    Add,
    Added,
    Delta,
    Out,
    Ready,
    Request,
    Reset,
    ResetDone,
)

logger = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # an idle client's heartbeat (figures) at least this often
CLIENT_IO_TIMEOUT_S = 5.0  # a client that reads nothing this long is dropped
HASHES_EVERY_S = 1.0  # prefix-cache hashes (placement by affinity) this often


class Outbox:
    """The deltas one core owes one client, taken as lists in order; and the tasks of
    that client's requests (by request id)."""

    def __init__(self) -> None:
        self.items: list[Delta] = []
        self.ready = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def put(self, item: Delta) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self, timeout: float | None = None) -> list[Delta]:
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


async def pump(rid: str, source: AsyncIterator[Delta], box: Outbox) -> None:
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


class Core(Protocol):
    """What the server needs of the replica that hosts the engine."""

    def link_info(self) -> dict[str, Any]: ...

    def link_stats(self) -> dict[str, Any]: ...

    def prefix_report(self) -> list[int]: ...

    def start(self, req: Request, box: Outbox) -> str | None: ...

    async def reset_prefix_cache(self) -> dict[str, int]: ...


class CoreServer:
    def __init__(self, host: str, core: Core, key: bytes | None = None) -> None:
        """Binds a socket on ``host`` (a free port: ``address``); ``start`` serves it.
        ``key``: what clients must prove they hold (default: a random one)."""
        self.core = core
        self.key = key or os.urandom(32)
        self._sock = transport.listening_socket(host)
        host, port = self._sock.getsockname()[:2]
        self.address = transport.tcp_address(host, port)
        self.local_address = transport.listen_local(f"{id(self):x}", self.key, self._client)
        self.boxes: set[Outbox] = set()
        self.messages = 0  # messages sent with deltas ...
        self.deltas = 0  # ... carrying this many
        self._names = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._resets: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Serves on the running event loop until ``close``."""
        self._task = asyncio.ensure_future(self._serve())

    def live(self) -> int:
        """Requests of every client running here."""
        return sum(len(box.tasks) for box in self.boxes)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for box in list(self.boxes):
            box.cancel_all()
        transport.unlisten_local(self.local_address.removeprefix("local://"))
        with contextlib.suppress(OSError):
            self._sock.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._accept, sock=self._sock)
        async with server:
            await server.serve_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport.tune(writer)
        try:
            await transport.handshake(reader, writer, self.key)
        except transport.LinkClosed as e:
            logger.warning("engine core refused a client: %s", e)
            writer.close()
            return
        await self._client(transport.SocketEnd(reader, writer))

    async def _client(self, end: transport.End) -> None:
        name = f"client-{next(self._names)}"
        box = Outbox()
        self.boxes.add(box)
        end.send(Ready(self.core.link_info(), self.core.link_stats()))
        out = asyncio.ensure_future(self._write(end, box))
        logger.info("engine core: %s attached (%d clients)", name, len(self.boxes))
        try:
            await self._read(end, box, out.done)
        except transport.LinkClosed as e:
            logger.info("engine core: %s left (%s)", name, e)
        finally:
            self.boxes.discard(box)
            box.cancel_all()  # its requests are aborted: their blocks return
            out.cancel()
            end.close()

    async def _read(self, end: transport.End, box: Outbox,
                    writer_done: Callable[[], bool]) -> None:  # fmt: skip
        while not writer_done():
            match await end.recv():
                case Add(req):
                    try:
                        refused = self.core.start(req, box)
                    except Exception as e:  # a dead engine: the client tries another core
                        refused = f"{GONE}{type(e).__name__}: {e}"
                    end.send(Added(req["request_id"], refused))
                case Abort(rid):
                    task = box.tasks.get(rid)
                    if task is not None:
                        task.cancel()
                case Reset(token):
                    task = asyncio.ensure_future(self._reset(end, token))
                    self._resets.add(task)  # held until done (the loop keeps weak refs)
                    task.add_done_callback(self._resets.discard)
                case msg:
                    raise transport.LinkClosed(f"a client sent {type(msg).__name__}")

    async def _reset(self, end: transport.End, token: str) -> None:
        forgotten: dict[str, int] = {}
        error = None
        try:
            forgotten = await self.core.reset_prefix_cache()
        except Exception as e:  # a dead engine: the API process reports it
            logger.exception("engine core: prefix-cache reset failed")
            error = f"{type(e).__name__}: {e}"
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            end.send(ResetDone(token, forgotten, error))

    async def _write(self, end: transport.End, box: Outbox) -> None:
        hashes_at = 0.0
        try:
            while True:
                try:
                    items = await box.take(REPORT_EVERY_S)
                except TimeoutError:
                    items = []
                hashes = None
                if (now := time.monotonic()) - hashes_at >= HASHES_EVERY_S:
                    hashes, hashes_at = self.core.prefix_report(), now
                if items:
                    self.messages += 1
                    self.deltas += len(items)
                end.send(Out(items, self.core.link_stats(), hashes))
                await asyncio.wait_for(end.drain(), CLIENT_IO_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError) as e:
            logger.warning("engine core: dropping a client whose link broke or stalled: %r", e)
            end.close()  # its reader sees the link close: cleanup follows
