"""Which rank sends which KV heads to which rank when a prefill group of TP ``p`` hands a
request to a decode group of TP ``d``, and the channels that carry them.

A model's KV heads are split over a group's ranks (``engine.parallel.kv_head_range``):
evenly, or one head per rank, replicated, when the group has more ranks than heads.
``kv_routes`` cuts the heads into *routes*: a run of heads that one prefill rank holds
and one decode rank needs, with where the run starts in each rank's cache. Every head
of every decode rank comes by exactly one route, from the lowest prefill rank that
holds it. At ``p == d`` the routes are rank r → rank r, every head (the plain case);
at ``1 → 2`` rank 0 sends each decode rank its half; at ``2 → 1`` the decode rank
takes one half from each prefill rank.

Each route is a 2-rank channel of its own (``KVChannel``, over a gloo or NCCL group
met through the link's store under ``route{src}-{dst}``). Order: every rank takes its
routes, to join them and to move a transfer, in one total order (first head, then
decode rank); the earliest unfinished route then always has both ends at it, so no
two ranks of a link can wait on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.parallel import kv_head_range
from workers.kv_transfer import SENDER, KVChannel


@dataclass(frozen=True, slots=True)
class Route:
    """Heads ``head .. head + count`` (of the model) from prefill rank ``src`` (where
    they start at ``src_lo`` in its cache) to decode rank ``dst`` (at ``dst_lo``)."""

    src: int
    dst: int
    head: int
    count: int
    src_lo: int
    dst_lo: int

    def end(self, role: int) -> tuple[int, tuple[int, int]]:
        """(this end's rank, its head slice ``(first, count)``) for ``role``."""
        if role == SENDER:
            return self.src, (self.src_lo, self.count)
        return self.dst, (self.dst_lo, self.count)


def kv_routes(num_kv_heads: int, senders: int, receivers: int) -> list[Route]:
    """The routes of a link from a group of ``senders`` ranks to one of ``receivers``,
    in the order every rank takes them."""
    holds = [kv_head_range(num_kv_heads, senders, i) for i in range(senders)]
    routes = []
    for dst in range(receivers):
        start, count = kv_head_range(num_kv_heads, receivers, dst)
        head = start
        while head < start + count:
            src = next(i for i, (lo, n) in enumerate(holds) if lo <= head < lo + n)
            lo, n = holds[src]
            end = min(start + count, lo + n)
            routes.append(Route(src, dst, head, end - head, head - lo, head - start))
            head = end
    return sorted(routes, key=lambda r: (r.head, r.dst))


class RankChannels:
    """One rank's channels of a link: a ``KVChannel`` per route it is an end of, joined
    in route order (each join blocks until the peer rank joined). ``send``/``recv`` move
    a transfer's blocks on each in the same order and return the bytes of all."""

    def __init__(self, store: Any, role: int, rank: int, routes: list[Route], backend: str,
                 timeout_s: float) -> None:  # fmt: skip
        self.channels: list[tuple[KVChannel, tuple[int, int]]] = []
        try:
            for route in routes:
                end, heads = route.end(role)
                if end == rank:
                    sub = dist.PrefixStore(f"route{route.src}-{route.dst}", store)
                    self.channels.append((KVChannel(sub, role, backend, timeout_s), heads))
        except BaseException:
            self.close()
            raise

    def send(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return sum(ch.send(kv_caches, block_ids, heads=heads) for ch, heads in self.channels)

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return sum(ch.recv(kv_caches, block_ids, heads=heads) for ch, heads in self.channels)

    def close(self) -> None:
        for ch, _ in self.channels:
            ch.close()


class GroupChannel:
    """One link's channels on every rank of a group: rank 0's (``RankChannels`` in this
    process) and ranks 1..N-1's, held by their ``RankWorker`` actors under ``key``.
    Block ids are the same on every rank. ``send``/``recv`` move every rank's share at
    once and return the bytes of all of them; a rank that fails, or does not finish
    within ``timeout_s``, fails the call. Built by ``join`` (blocks until every rank met
    its peers)."""

    def __init__(self, local: RankChannels, actors: list[Any], key: str, timeout_s: float) -> None:
        self.local, self.actors, self.key, self.timeout_s = local, actors, key, timeout_s

    @classmethod
    def join(cls, actors: list[Any], key: str, host: str, port: int, base_store: Any, role: int,
             routes: list[Route], backend: str, timeout_s: float) -> GroupChannel:  # fmt: skip
        """Ranks 1.. join through the store at ``host:port``; rank 0 through
        ``base_store`` (that store itself on the side that hosts it)."""
        import ray

        refs = [a.kv_join.remote(key, host, port, role, routes, backend, timeout_s)
                for a in actors]  # fmt: skip
        try:
            local = RankChannels(base_store, role, 0, routes, backend, timeout_s)
            ray.get(refs, timeout=timeout_s)
        except BaseException:
            for a in actors:
                a.kv_close.remote(key)
            raise
        return cls(local, actors, key, timeout_s)

    def send(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return self._move(True, kv_caches, block_ids)

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return self._move(False, kv_caches, block_ids)

    def _move(self, send: bool, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        import ray

        refs = [a.kv_move.remote(self.key, send, block_ids) for a in self.actors]
        try:
            n = (self.local.send if send else self.local.recv)(kv_caches, block_ids)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=False)
            raise
        return n + sum(int(x) for x in ray.get(refs, timeout=self.timeout_s))

    def close(self) -> None:
        self.local.close()
        for a in self.actors:
            a.kv_close.remote(self.key)
