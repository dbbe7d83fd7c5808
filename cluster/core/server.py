"""The engine core's side of its links: API processes attach over TCP and send requests.

Runs on the engine replica's event loop (``asyncio.start_server`` on a socket bound at
construction). Each attached client has an ``Outbox``: a request it adds runs as a task
(``pump``) that files the request's deltas there, and one writer task sends the outbox
as one message per batch (normally one engine step's worth for every request of that
client), with the core's figures, and the prefix-cache hashes every ``HASHES_EVERY_S``.
An idle client still gets a message every ``REPORT_EVERY_S`` (its link's heartbeat).

The messages are ``cluster.core.messages``'s, in ``cluster.core.transport`` frames.

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
from cluster.core.messages import ABORT, ADD, ADDED, GONE, OUT, READY

logger = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # an idle client's heartbeat (figures) at least this often
CLIENT_IO_TIMEOUT_S = 5.0  # a client that reads nothing this long is dropped
HASHES_EVERY_S = 1.0  # prefix-cache hashes (placement by affinity) this often


class Outbox:
    """The deltas one core owes one client, taken as lists in order; and the tasks of
    that client's requests (by request id)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}

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


class Core(Protocol):
    """What the server needs of the replica that hosts the engine."""

    def link_info(self) -> dict[str, Any]: ...

    def link_stats(self) -> dict[str, Any]: ...

    def prefix_report(self) -> list[int]: ...

    def start(self, req: dict[str, Any], box: Outbox) -> str | None: ...


class CoreServer:
    def __init__(self, host: str, core: Core, key: bytes | None = None) -> None:
        """Binds a socket on ``host`` (a free port: ``address``); ``start`` serves it.
        ``key``: what clients must prove they hold (default: a random one)."""
        self.core = core
        self.key = key or os.urandom(32)
        self._sock = transport.listening_socket(host)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self.boxes: set[Outbox] = set()
        self.messages = 0  # messages sent with deltas ...
        self.deltas = 0  # ... carrying this many
        self._names = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

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
        with contextlib.suppress(OSError):
            self._sock.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._client, sock=self._sock)
        async with server:
            await server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = f"client-{next(self._names)}"
        transport.tune(writer)
        try:
            await transport.handshake(reader, writer, self.key)
        except transport.LinkClosed as e:
            logger.warning("engine core refused a client: %s", e)
            writer.close()
            return
        box = Outbox()
        self.boxes.add(box)
        transport.send(writer, (READY, self.core.link_info(), self.core.link_stats()))
        out = asyncio.ensure_future(self._write(writer, box))
        logger.info("engine core: %s attached (%d clients)", name, len(self.boxes))
        try:
            await self._read(reader, writer, box, out.done)
        except transport.LinkClosed as e:
            logger.info("engine core: %s left (%s)", name, e)
        finally:
            self.boxes.discard(box)
            box.cancel_all()  # its requests are aborted: their blocks return
            out.cancel()
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    box: Outbox, writer_done: Callable[[], bool]) -> None:  # fmt: skip
        while not writer_done():
            msg = await transport.recv(reader)
            kind = msg[0]
            if kind == ADD:
                req = msg[1]
                try:
                    refused = self.core.start(req, box)
                except Exception as e:  # a dead engine: the client tries another core
                    refused = f"{GONE}{type(e).__name__}: {e}"
                transport.send(writer, (ADDED, req["request_id"], refused))
            elif kind == ABORT:
                task = box.tasks.get(str(msg[1]))
                if task is not None:
                    task.cancel()
            else:
                raise transport.LinkClosed(f"unknown command {kind!r}")

    async def _write(self, writer: asyncio.StreamWriter, box: Outbox) -> None:
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
                transport.send(writer, (OUT, items, self.core.link_stats(), hashes))
                await asyncio.wait_for(writer.drain(), CLIENT_IO_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError) as e:
            logger.warning("engine core: dropping a client whose link broke or stalled: %r", e)
            writer.transport.abort()  # its reader sees the link close: cleanup follows
