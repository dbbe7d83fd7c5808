"""The block pool of one engine instance: the only owner of its KV block ids.

Pure Python (ints and hashes). Each block has a reference count and, once full and
computed, may carry a prefix hash. Blocks with ``ref_cnt == 0`` sit in the free
queue; a free block that still carries a hash is an evictable prefix-cache entry::

    free queue:  front [b7 b3 | b9 b2 b5] back
                  ^ taken first by allocate()
                  unhashed blocks go to the front, hashed ones to the back, so
                  cached prefixes are evicted last and least-recently-freed first.

Invariants (checked by ``check()`` and the property tests): ``ref_cnt >= 0``; a block
is in the free queue iff its ``ref_cnt`` is 0; ``len(free) + in_use == num_blocks``;
``cached[h] == b`` implies ``block_hash[b] == h``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[bytes, int] = {}

    # --- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now (evictable cached blocks included)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one request."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this prefix hash, if cached. Does not take a reference."""
        return self._cached.get(block_hash) if self.enable_caching else None

    def cached_hashes(self) -> list[bytes]:
        return list(self._cached)

    # --- mutations -----------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        """Takes one reference on each block (prefix-cache hits or sharing)."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` blocks from the front of the free queue, evicting their hashes.

        Raises ``NoFreeBlocksError`` (and changes nothing) if fewer than ``n`` are free.
        """
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drops one reference on each block, in order: the first block freed is
        evicted first among the hashed ones."""
        for b in block_ids:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Records that ``block_id`` (referenced, full, its K/V computed or being
        computed in this step) holds the prefix ``block_hash``. If another block
        already holds that prefix, this one stays uncached."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix of unreferenced blocks (blocks a request holds
        keep theirs); returns how many cached blocks were forgotten."""
        before = len(self._cached)
        for b in list(self._free):
            self._evict(b)
        return before - len(self._cached)

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            if self._cached.get(h) == b:
                del self._cached[h]

    def check(self) -> None:
        """Asserts the invariants in the module docstring."""
        in_use = 0
        for b in range(self.num_blocks):
            assert self.ref_cnt[b] >= 0, f"block {b} has ref_cnt {self.ref_cnt[b]}"
            assert (self.ref_cnt[b] == 0) == (b in self._free), f"block {b} free/ref mismatch"
            in_use += self.ref_cnt[b] > 0
        assert in_use + len(self._free) == self.num_blocks
        for h, b in self._cached.items():
            assert self.block_hash[b] == h
