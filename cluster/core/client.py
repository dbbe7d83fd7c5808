"""An API process's link to one engine core (``cluster.core.server``). Torch-free.

``CoreLink.open`` connects (``cluster.core.transport.connect``: TCP, or in-process for
a core of this process) and passes the key check; then one reader task files
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
import itertools
import logging
from typing import Any

from cluster.core import transport
from cluster.core.messages import (
    FULL,
    GONE,
    Abort,
    Add,
    Added,
    Delta,
    EngineGone,
    Out,
    PoolFull,
    Ready,
    Request,
    Reset,
    ResetDone,
)

logger = logging.getLogger(__name__)

SILENCE_S = 30.0  # a link with no message this long is dead
DeltaQueue = asyncio.Queue[Delta | BaseException]
_TOKENS = itertools.count(1)


class CoreLink:
    def __init__(self, instance_id: str, end: transport.End, info: dict[str, Any],
                 stats: dict[str, Any]) -> None:  # fmt: skip
        """Use ``open``. ``info``: what the core said of itself (model, role, context,
        how it hashes prefix blocks); ``stats``: its figures, as of the last message."""
        self.instance_id = instance_id
        self.info = info
        self.stats = stats
        self.held: frozenset[int] = frozenset()  # its prefix-cache blocks (short hashes)
        self.live = 0  # requests of this process on it
        self.dead: str | None = None
        self._end = end
        self._queues: dict[str, DeltaQueue] = {}
        self._added: dict[str, asyncio.Future[str | None]] = {}
        self._resets: dict[str, asyncio.Future[tuple[dict[str, int], str | None]]] = {}
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, instance_id: str, address: str, key: bytes) -> CoreLink:
        """Connects to the core at ``address`` (``tcp://host:port``, ``local://name``);
        ``transport.LinkClosed`` if it cannot be reached, refuses the key or does not
        say it is ready."""
        end = await transport.connect(address, key)
        try:
            msg = await asyncio.wait_for(end.recv(), transport.HANDSHAKE_TIMEOUT_S)
            if not isinstance(msg, Ready):
                raise transport.LinkClosed(f"the core answered {type(msg).__name__}")
        except BaseException:
            end.close()
            raise
        return cls(instance_id, end, msg.info, msg.stats)

    @property
    def role(self) -> str:
        return str(self.info.get("role", "both"))

    def load(self) -> float:
        """Requests on the core: this process's live ones or what it last reported
        running and waiting (every API process's), whichever is larger."""
        s = self.stats
        return float(max(self.live, int(s.get("running", 0)) + int(s.get("waiting", 0))))

    async def add(self, req: Request) -> DeltaQueue:
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
            self._end.send(Add(req))
            await self._end.drain()
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

    async def reset_prefix_cache(self) -> dict[str, int]:
        """Has the core empty its prefix cache of blocks no request holds (a decode core
        also has its prefill pool's instances do it); the cached blocks each instance
        forgot. ``EngineGone`` when the core, its engine or the link failed."""
        if self.dead is not None:
            raise EngineGone(f"engine instance {self.instance_id}: {self.dead}")
        token = f"reset-{next(_TOKENS)}"
        done: asyncio.Future[tuple[dict[str, int], str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._resets[token] = done
        try:
            self._end.send(Reset(token))
            await self._end.drain()
            forgotten, error = await done
        except (ConnectionError, OSError) as e:
            self._die(f"{type(e).__name__}: {e}")
            raise EngineGone(f"engine instance {self.instance_id}: {e}") from e
        finally:
            self._resets.pop(token, None)
        if error is not None:
            raise EngineGone(f"engine instance {self.instance_id}: {error}")
        return forgotten

    def abort(self, rid: str) -> None:
        """Drops ``rid`` here and has the core abort it (a no-op there once finished)."""
        if self._queues.pop(rid, None) is None or self.dead is not None:
            return
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self._end.send(Abort(rid))

    def forget(self, rid: str) -> None:
        """A finished request: nothing more comes for it."""
        self._queues.pop(rid, None)

    def close(self) -> None:
        """Leaves the core (it aborts this link's requests)."""
        self._die("the link was closed")

    async def _read(self) -> None:
        try:
            while True:
                match await asyncio.wait_for(self._end.recv(), SILENCE_S):
                    case Out(deltas, stats, hashes):
                        self.stats = stats
                        if hashes is not None:
                            self.held = frozenset(hashes)
                        for d in deltas:
                            queue = self._queues.get(str(d.get("request_id")))
                            if queue is not None:
                                queue.put_nowait(d)
                    case Added(rid, refused):
                        fut = self._added.get(rid)
                        if fut is not None and not fut.done():
                            fut.set_result(refused)
                    case ResetDone(token, forgotten, error):
                        done = self._resets.get(token)
                        if done is not None and not done.done():
                            done.set_result((forgotten, error))
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
        futures: list[asyncio.Future[Any]] = [*self._added.values(), *self._resets.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)
        self._end.close()
        if asyncio.current_task() is not self._task:
            self._task.cancel()
