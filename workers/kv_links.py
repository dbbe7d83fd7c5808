"""The KV channels of one pool replica: one per peer replica, made on demand.

A prefill replica *offers* a link to a decode replica the first time that decode
replica asks it for a prefill: it binds a ``TCPStore`` on its node (any free port) and
joins a 2-rank group as the sender in a background thread, while the decode replica,
reading the offer from the prefill stream, joins as the receiver. Later transfers
between the pair reuse the link; pools grow and shrink without a fixed world.

Order: the sender numbers the transfers of a link (``seq``) and sends them strictly in
that order (one at a time); the receiver receives them in the same order whatever
order their streams deliver the headers in. Both ends therefore issue the same
sequence of point-to-point operations, which NCCL requires, and no two transfers of a
pair can wait on each other. A link that fails (a peer died, a header mismatch, a
timeout) is closed at both ends; the next request offers a new one (``gen`` + 1), and
the requests that were waiting on the broken one fall back to recomputing.

Tensor parallelism: a link is a channel per *route* on every rank of both groups
(``workers.kv_routes``): at equal TP rank r sends its head group to rank r; between
different TPs (the decode replica says its TP in the request, the offer says the
prefill's) the heads are re-sliced, each run of heads going from the prefill rank that
holds it to the decode rank that needs it. All ranks move their share at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.comm import tcp_store
from workers.kv_routes import GroupChannel, Route, kv_routes
from workers.kv_transfer import RECEIVER, SENDER, synced

logger = logging.getLogger(__name__)


class LinkError(RuntimeError):
    """A KV link failed or was closed; its pending transfers are abandoned."""


@dataclass(slots=True)
class _Link:
    peer: str
    gen: int
    channel_task: asyncio.Future[GroupChannel]
    next_seq: int = 0
    broken: BaseException | None = None
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    offer: dict[str, Any] = field(default_factory=dict)

    async def channel(self, timeout_s: float) -> GroupChannel:
        if self.broken is not None:
            raise LinkError(f"link to {self.peer} is broken: {self.broken}")
        try:
            return await asyncio.wait_for(asyncio.shield(self.channel_task), timeout_s)
        except Exception as e:
            raise LinkError(f"link to {self.peer} (gen {self.gen}) did not come up: {e}") from e


class KVLinks:
    """The links of one replica (``instance_id``) to its peers, both directions.

    ``backend``: "gloo" (CPU caches) or "nccl" (CUDA caches). ``timeout_s`` bounds the
    rendezvous, each wait for a turn, and each send/receive. ``kv_heads``: the model's
    KV heads (both ends must serve one model); ``ranks``: the rank actors 1.. of this
    replica's group."""

    def __init__(self, instance_id: str, host: str, backend: str, kv_heads: int,
                 timeout_s: float = 30.0, ranks: list[Any] | None = None) -> None:  # fmt: skip
        self.instance_id = instance_id
        self.kv_heads = kv_heads
        self.host = host
        self.backend = backend
        self.timeout_s = timeout_s
        self.ranks = list(ranks or ())  # the RankWorker actors of ranks 1.. (TP > 1)
        self.tp = 1 + len(self.ranks)
        self._send: dict[str, _Link] = {}  # decode peer -> link
        self._recv: dict[tuple[str, int], _Link] = {}  # (prefill peer, gen) -> link
        self._gens = itertools.count(1)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.failures = 0

    # --- sender (prefill) side ----------------------------------------------------------
    def offer(self, peer: str, stale: list[int] | tuple[int, ...], peer_tp: int) -> dict[str, Any]:
        """The offer for ``peer`` (a decode replica of TP ``peer_tp``): an open link's,
        or a new one whose rendezvous starts now in the background. ``stale``:
        generations the peer has closed on its side (they are closed here too, and a new
        link is offered)."""
        link = self._send.get(peer)
        if link is not None and link.broken is None and link.gen in stale:
            self._break(link, LinkError(f"{peer} closed link gen {link.gen}"))
        if link is not None and link.broken is None:
            return link.offer
        gen = next(self._gens)
        store = tcp_store(self.host, 0, True, 2, self.timeout_s)
        loop = asyncio.get_running_loop()
        key = f"send:{peer}:{gen}"
        routes = kv_routes(self.kv_heads, self.tp, peer_tp)
        task = loop.run_in_executor(
            None, lambda: self._channel(key, store, store.port, SENDER, routes)
        )
        link = _Link(peer, gen, task)
        link.offer = {"peer": self.instance_id, "gen": gen, "host": self.host, "port": store.port,
                      "tp": self.tp, "peer_tp": peer_tp, "kv_heads": self.kv_heads}  # fmt: skip
        self._send[peer] = link
        logger.info("offering a KV link to %s (gen %d) on %s:%d", peer, gen, self.host, store.port)
        return link.offer

    async def send(self, peer: str, caches: list[torch.Tensor], block_ids: list[int],
                   announce: Any) -> tuple[int, float]:  # fmt: skip
        """Sends ``block_ids`` of ``caches`` to ``peer`` in this link's next turn.
        ``announce(seq)`` is awaited first (it tells the receiver which turn to expect).
        Returns (bytes, seconds). A failure breaks the link and raises ``LinkError``."""
        link = self._send[peer]
        channel = await link.channel(self.timeout_s)
        async with link.cond:  # one transfer at a time, in seq order
            seq = link.next_seq
            link.next_seq += 1
            await announce(seq)
            nbytes, secs = await self._move(link, channel.send, caches, block_ids, "sending to")
        self.bytes_sent += nbytes
        return nbytes, secs

    # --- receiver (decode) side ---------------------------------------------------------
    def accept(self, offer: dict[str, Any]) -> tuple[str, int]:
        """Joins the link ``offer`` describes (once per (peer, gen)); returns its key."""
        key = (str(offer["peer"]), int(offer["gen"]))
        if (int(offer["kv_heads"]), int(offer["peer_tp"])) != (self.kv_heads, self.tp):
            raise LinkError(f"prefill replica {key[0]} offers a link for {offer['kv_heads']} KV "
                            f"heads at decode TP {offer['peer_tp']}; this decode replica has "
                            f"{self.kv_heads} at TP {self.tp}")  # fmt: skip
        if key not in self._recv:
            for old in [k for k in self._recv if k[0] == key[0] and k[1] < key[1]]:
                self._break(self._recv.pop(old), LinkError("replaced by a newer link"))
            host, port = str(offer["host"]), int(offer["port"])
            name = f"recv:{key[0]}:{key[1]}"
            routes = kv_routes(self.kv_heads, int(offer["tp"]), self.tp)
            loop = asyncio.get_running_loop()
            task = loop.run_in_executor(None, lambda: self._channel(
                name, tcp_store(host, port, False, 2, self.timeout_s), port, RECEIVER, routes,
                host))  # fmt: skip
            self._recv[key] = _Link(key[0], key[1], task)
        return key

    def _channel(self, name: str, store: Any, port: int, role: int, routes: list[Route],
                 host: str | None = None) -> GroupChannel:  # fmt: skip
        """The channels of one link on every rank of this group (blocks until each met
        its peers: the ranks of both groups meet through the one store, a route each)."""
        return GroupChannel.join(self.ranks, name, host or self.host, port, store, role, routes,
                                 self.backend, self.timeout_s)  # fmt: skip

    async def recv(self, key: tuple[str, int], seq: int, caches: list[torch.Tensor],
                   block_ids: list[int]) -> tuple[int, float]:  # fmt: skip
        """Receives turn ``seq`` of link ``key`` into ``block_ids`` (waits for the turns
        before it). Returns (bytes, seconds); a failure breaks the link (``LinkError``)."""
        link = self._recv.get(key)
        if link is None:
            raise LinkError(f"no link {key}")
        channel = await link.channel(self.timeout_s)
        async with link.cond:
            try:
                await asyncio.wait_for(
                    link.cond.wait_for(lambda: link.next_seq == seq or link.broken is not None),
                    self.timeout_s,
                )
            except TimeoutError as e:
                self._break(link, e)
                raise LinkError(f"turn {seq} of link {key} never came") from e
            if link.broken is not None:
                raise LinkError(f"link {key} is broken: {link.broken}")
            nbytes, secs = await self._move(link, channel.recv, caches, block_ids, "receiving from")
            link.next_seq += 1
            link.cond.notify_all()
        self.bytes_received += nbytes
        return nbytes, secs

    async def _move(self, link: _Link, op: Any, caches: list[torch.Tensor], block_ids: list[int],
                    what: str) -> tuple[int, float]:  # fmt: skip
        """Runs one send/receive off the event loop, bounded by ``timeout_s``; a failure
        breaks the link, and returns only once the copy stopped (or a second
        ``timeout_s`` passed), so the caller may reuse the blocks. Returns (bytes,
        seconds)."""
        t0 = time.perf_counter()
        copy = asyncio.ensure_future(asyncio.to_thread(synced, op, caches, block_ids))
        try:
            nbytes = await asyncio.wait_for(asyncio.shield(copy), self.timeout_s)
        except BaseException as e:
            self._break(link, e)  # closes the channel: a blocked send/receive fails
            if not copy.done():  # the blocks are not free while it may still write them
                await asyncio.wait([copy], timeout=self.timeout_s)
                if not copy.done():
                    logger.error("a %s %s outlived its link", what, link.peer)
            raise LinkError(f"{what} {link.peer} failed: {e!r}") from e
        return nbytes, time.perf_counter() - t0

    def stale_links(self) -> list[tuple[str, int]]:
        """(prefill peer, gen) of the receiving links closed here, newest per peer: a
        prefill replica offering one of them must offer a new link instead."""
        newest: dict[str, int] = {}
        for (peer, gen), link in self._recv.items():
            if link.broken is not None:
                newest[peer] = max(newest.get(peer, 0), gen)
        return sorted(newest.items())

    def break_peer(self, peer: str, why: BaseException) -> None:
        """Closes every receiving link from ``peer`` (its next transfer rebuilds one)."""
        for (p, _), link in list(self._recv.items()):
            if p == peer:
                self._break(link, why)

    def break_link(self, key: tuple[str, int], why: BaseException) -> None:
        """The peer is gone (its stream failed): closes the link, wakes its waiters."""
        link = self._recv.get(key)
        if link is not None:
            self._break(link, why)

    def close(self) -> None:
        for link in [*self._send.values(), *self._recv.values()]:
            self._break(link, LinkError("replica shutting down"))

    def _break(self, link: _Link, why: BaseException) -> None:
        if link.broken is not None:
            return
        link.broken = why
        self.failures += 1
        logger.warning("KV link to %s (gen %d) broken: %r", link.peer, link.gen, why)
        if link.channel_task.done() and not link.channel_task.cancelled():
            with contextlib.suppress(Exception):
                link.channel_task.result().close()

        async def wake() -> None:
            async with link.cond:
                link.cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody waits
            asyncio.get_running_loop().create_task(wake())
