"""An API process's link to one engine core (``cluster.core.server``). Torch-free.

``CoreLink.open`` connects and passes the key challenge; then one reader task files
each message's deltas into their requests' queues and keeps the core's figures
(``stats``) and prefix-cache hashes (``held``) current. ``add`` sends a request and
returns its queue once the core took it; ``abort`` drops it there.

When the link dies (the core closed it, its process died, no message for
``SILENCE_S``: the core sends one at least every second), every open request's queue
gets an ``EngineGone``, and waiting ``add`` calls raise it: the caller resumes its
requests on another core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cluster.core import transport
from cluster.core.messages import ABORT, ADD, ADDED, FULL, GONE, OUT, READY, EngineGone, PoolFull

logger = logging.getLogger(__name__)

SILENCE_S = 30.0  # a link with no message this long is dead
DeltaQueue = asyncio.Queue[dict[str, Any] | BaseException]


class CoreLink:
    def __init__(self, instance_id: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, info: dict[str, Any],
                 stats: dict[str, Any]) -> None:  # fmt: skip
        """Use ``open``. ``info``: what the core said of itself (model, role, context,
        how it hashes prefix blocks); ``stats``: its figures, as of the last message."""
        self.instance_id = instance_id
        self.info = info
        self.stats = stats
        self.held: frozenset[int] = frozenset()  # its prefix-cache blocks (short hashes)
        self.live = 0  # requests of this process on it
        self.dead: str | None = None
        self._reader = reader
        self._writer = writer
        self._queues: dict[str, DeltaQueue] = {}
        self._added: dict[str, asyncio.Future[str | None]] = {}
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, instance_id: str, host: str, port: int, key: bytes) -> CoreLink:
        """Connects to the core at ``host:port``; ``transport.LinkClosed`` if it cannot
        be reached, refuses the key or does not say it is ready."""
        reader, writer = await transport.connect(host, port, key)
        try:
            msg = await asyncio.wait_for(transport.recv(reader), transport.HANDSHAKE_TIMEOUT_S)
            if msg[0] != READY:
                raise transport.LinkClosed(f"the core answered {msg[0]!r}")
        except BaseException:
            writer.close()
            raise
        return cls(instance_id, reader, writer, msg[1], msg[2])

    @property
    def role(self) -> str:
        return str(self.info.get("role", "both"))

    def load(self) -> float:
        """Requests on the core: this process's live ones or what it last reported
        running and waiting (every API process's), whichever is larger."""
        s = self.stats
        return float(max(self.live, int(s.get("running", 0)) + int(s.get("waiting", 0))))

    async def add(self, req: dict[str, Any]) -> DeltaQueue:
        """Sends ``req`` (``request_id`` set); its deltas' queue once the core took it.
        ``PoolFull`` when the core refused it (queue full), ``EngineGone`` when the core
        or the link failed."""
        if self.dead is not None:
            raise EngineGone(f"engine instance {self.instance_id}: {self.dead}")
        rid = str(req["request_id"])
        queue: DeltaQueue = asyncio.Queue()
        added: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queues[rid] = queue
        self._added[rid] = added
        try:
            transport.send(self._writer, (ADD, req))
            await self._writer.drain()
            refused = await added
        except (ConnectionError, OSError) as e:
            self._die(f"{type(e).__name__}: {e}")
            refused = f"{GONE}{e}"
        except BaseException:
            self.abort(rid)
            raise
        finally:
            self._added.pop(rid, None)
        if refused is not None:
            self._queues.pop(rid, None)
            if refused.startswith(FULL):
                raise PoolFull(refused.removeprefix(FULL))
            raise EngineGone(f"engine instance {self.instance_id}: {refused}")
        return queue

    def abort(self, rid: str) -> None:
        """Drops ``rid`` here and has the core abort it (a no-op there once finished)."""
        if self._queues.pop(rid, None) is None or self.dead is not None:
            return
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            transport.send(self._writer, (ABORT, rid))

    def forget(self, rid: str) -> None:
        """A finished request: nothing more comes for it."""
        self._queues.pop(rid, None)

    def close(self) -> None:
        """Leaves the core (it aborts this link's requests)."""
        self._die("the link was closed")

    async def _read(self) -> None:
        try:
            while True:
                msg = await asyncio.wait_for(transport.recv(self._reader), SILENCE_S)
                kind = msg[0]
                if kind == OUT:
                    _, deltas, self.stats, hashes = msg
                    if hashes is not None:
                        self.held = frozenset(hashes)
                    for d in deltas:
                        queue = self._queues.get(str(d.get("request_id")))
                        if queue is not None:
                            queue.put_nowait(d)
                elif kind == ADDED:
                    fut = self._added.get(str(msg[1]))
                    if fut is not None and not fut.done():
                        fut.set_result(msg[2])
        except TimeoutError:
            self._die(f"no message from the core in {SILENCE_S:.0f} s")
        except transport.LinkClosed as e:
            self._die(f"the link broke: {e}")
        except Exception as e:  # a message this side cannot take: the link is unusable
            logger.exception("link to engine instance %s failed", self.instance_id)
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, why: str) -> None:
        if self.dead is not None:
            return
        self.dead = why
        err = EngineGone(f"engine instance {self.instance_id} is gone: {why}")
        for queue in self._queues.values():
            queue.put_nowait(err)
        self._queues.clear()
        for fut in self._added.values():
            if not fut.done():
                fut.set_exception(err)
        self._writer.close()
        if asyncio.current_task() is not self._task:
            self._task.cancel()
