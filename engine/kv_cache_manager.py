"""Block tables of the requests of one instance, on top of the block pool.

Pure Python. A request's block table is append-only while it runs; block ``i``
holds tokens ``[i * block_size, (i + 1) * block_size)`` of ``all_token_ids``::

    tokens:  |0 ........ 15|16 ....... 31|32 .. 37      |
    table:   [    b4       ,     b9      ,    b2         ]
              full, hashed   full, hashed  partial, never shared

Only full blocks are hashed and shared. ``free`` returns every block of a request.

A prefix hit is on the device (a block id) or on the pool's host tier (``HOST``): the
block is restored, by a copy queued for the step, when the request takes its hits.
"""

from __future__ import annotations

from engine.block_hash import extend_block_hashes
from engine.block_pool import BlockPool
from engine.kv_budget import blocks_for
from engine.request import Request

# A prefix hit held by the host tier: restored into a fresh device block when taken.
HOST = None
Hit = int | None


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, extra_key: bytes = b"") -> None:
        self.pool = pool
        self.block_size = block_size
        self.extra_key = extra_key
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def free_beside(self, hits: list[Hit]) -> int:
        """Blocks a request taking ``hits`` can still allocate: the free ones less its
        device hits nobody holds (free and evictable, but about to be taken)."""
        pool = self.pool
        return pool.num_free_blocks - sum(1 for b in hits if b is not HOST and pool.ref_cnt[b] == 0)

    def find_cached_prefix(self, request: Request, host: bool = True) -> list[Hit]:
        """The leading blocks of ``request``'s tokens that are cached (no reference
        taken): a device block id, or ``HOST`` where the host tier holds it (``host``
        False: device hits only). At least one token is always left to compute, so the
        step yields logits."""
        if not self.pool.enable_caching:
            return []
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, self.extra_key
        )
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Hit] = []
        for h in request.block_hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None and not (host and self.pool.host_lookup(h)):
                break
            hits.append(b)
        return hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: list[Hit] | None = None
    ) -> bool:
        """Makes room for ``num_new_tokens`` more computed tokens of ``request``.

        ``cached_blocks`` (first admission only) are prefix hits to take references on;
        the caller then advances ``num_computed_tokens`` past them. Returns False and
        changes nothing when the pool cannot supply the blocks. Full blocks covered by
        this step are hashed into the prefix cache (their K/V are written this step,
        before any attention of this step reads them).
        """
        cached_blocks = cached_blocks or []
        table = self._tables.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.num_blocks_for(total) - len(table) - len(cached_blocks)
        if self._grow(request, cached_blocks, num_new_blocks) is None:
            return False
        table = self._tables[request.request_id]
        self._cache_full_blocks(request, table, total, already=len(cached_blocks))
        return True

    def _grow(
        self, request: Request, cached_blocks: list[Hit], n: int, spill: bool = True
    ) -> list[int] | None:
        """Appends ``cached_blocks`` (taking references; host hits restored into fresh
        device blocks) and ``n`` fresh blocks to ``request``'s table; the fresh ones, or
        None (nothing changed) when the pool cannot supply them. Device hits nobody
        holds are evictable, so they count against the free blocks."""
        on_device = [b for b in cached_blocks if b is not HOST]
        if n + len(cached_blocks) - len(on_device) > self.free_beside(cached_blocks):
            return None
        self.pool.touch(on_device)  # before restoring: a restore must not evict them
        hashes = request.block_hashes
        restored = iter(self.pool.restore([hashes[i] for i, b in enumerate(cached_blocks)
                                           if b is HOST]))  # fmt: skip
        table = [b if b is not HOST else next(restored) for b in cached_blocks]
        fresh = self.pool.allocate(n, spill) if n > 0 else []
        self._tables.setdefault(request.request_id, []).extend([*table, *fresh])
        return fresh

    def allocate_for_transfer(
        self, request: Request, num_tokens: int, cached_blocks: list[Hit] | None = None
    ) -> list[int] | None:
        """Blocks for ``num_tokens`` of K/V that will arrive from another instance, after
        ``cached_blocks`` (prefix hits here: ``find_cached_prefix``), which are taken by
        reference and need no transfer. Returns only the blocks to receive into: they
        are allocated but not hashed into the prefix cache (nobody may hit them before
        the data lands; ``commit_transfer`` hashes them). None (nothing taken) when the
        pool has no room. Hits are device blocks only, and no evicted block is spilled:
        the transfer writes its blocks outside any step, so no copy may be queued."""
        assert request.request_id not in self._tables
        hits: list[Hit] = list(cached_blocks or [])
        assert HOST not in hits, "a transfer takes device hits only"
        fresh = self._grow(request, hits, self.num_blocks_for(num_tokens) - len(hits), False)
        if fresh is not None:
            self._num_hashed[request.request_id] = len(hits)
        return fresh

    def commit_transfer(self, request: Request, num_tokens: int) -> None:
        """The transferred K/V of ``num_tokens`` tokens is in place: hash its full blocks."""
        self._cache_full_blocks(request, self._tables[request.request_id], num_tokens, already=0)

    def _cache_full_blocks(
        self, request: Request, table: list[int], num_tokens: int, already: int
    ) -> None:
        if not self.pool.enable_caching:
            return
        start = max(self._num_hashed.get(request.request_id, 0), already)
        # Only blocks of known tokens (a pending one is hashed by a later step).
        end = min(num_tokens, request.num_tokens) // self.block_size
        if end <= start:
            return
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, self.extra_key
        )
        for i in range(start, end):
            self.pool.cache_block(table[i], request.block_hashes[i])
        self._num_hashed[request.request_id] = end

    def free(self, request: Request) -> None:
        """Returns every block of ``request`` to the pool (tail blocks evicted first)."""
        table = self._tables.pop(request.request_id, [])
        self._num_hashed.pop(request.request_id, None)
        self.pool.free(reversed(table))

    @property
    def num_requests(self) -> int:
        return len(self._tables)
