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

The host tier (``num_host_blocks > 0``): a second pool of blocks in host memory that the
pool also owns. A cached block evicted to make room is *spilled*: its prefix hash moves
to a host block (least-recently-used host entry replaced), and the copy device → host
is queued. A later prefix hit on the host tier is *restored*: a device block is
allocated, takes the hash, and the copy host → device is queued. The tier is inclusive
(a restored prefix stays on the host too, so evicting it again copies nothing).

The queued copies are the step's: ``take_copies()`` hands them to the step that the
scheduler is describing, and the runner does every spill before every restore, both
before the step's forward, in queue order. A host block a queued restore reads is not
reused until the copies are taken, so no copy reads a block a later one overwrote.
Host invariants: ``host[h] == hb`` for exactly one ``h`` per used host block; used +
free host blocks == ``num_host_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free."""


class BlockPool:
    def __init__(
        self, num_blocks: int, enable_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # The host tier: prefix hash -> host block, least recently used first.
        self.num_host_blocks = num_host_blocks if enable_caching else 0
        self._host: OrderedDict[bytes, int] = OrderedDict()
        self._host_free = list(range(self.num_host_blocks - 1, -1, -1))
        self._host_busy: set[int] = set()  # read by a queued restore
        self._spills: list[tuple[int, int]] = []  # (device block, host block)
        self._restores: list[tuple[int, int]] = []  # (host block, device block)
        self.num_spilled = 0  # blocks copied to the host tier, ever
        self.num_restored = 0  # blocks copied back from it, ever

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

    @property
    def num_host_cached_blocks(self) -> int:
        return len(self._host)

    def host_lookup(self, block_hash: bytes) -> bool:
        """Whether the host tier holds this prefix hash (no device block does, or may)."""
        return block_hash in self._host

    def host_hashes(self) -> list[bytes]:
        """The host tier's prefix hashes, least recently used first."""
        return list(self._host)

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The copies queued since the last call: ``(spills, restores)``, spills as
        (device block, host block), restores as (host block, device block). The caller
        runs them before anything reads or writes those device blocks: spills first."""
        out = (self._spills, self._restores)
        self._spills, self._restores = [], []
        self._host_busy.clear()
        return out

    # --- mutations -----------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        """Takes one reference on each block (prefix-cache hits or sharing)."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1

    def allocate(self, n: int, spill: bool = True) -> list[int]:
        """Takes ``n`` blocks from the front of the free queue, evicting their hashes
        (spilled to the host tier when there is one, unless ``spill`` is False: blocks
        written outside a step, as a KV transfer's, must not have a copy queued).

        Raises ``NoFreeBlocksError`` (and changes nothing) if fewer than ``n`` are free.
        """
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b, spill and self.num_host_blocks > 0)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def restore(self, block_hashes: list[bytes]) -> list[int]:
        """Allocates a device block for each prefix the host tier holds (``host_lookup``),
        caches the hash on it and queues the copy host → device; returns the blocks, one
        reference taken on each. Every source is protected before the first allocation
        (which may spill, and so replace a host entry). The caller checked that enough
        blocks are free (else ``NoFreeBlocksError`` midway)."""
        sources = [self._host[h] for h in block_hashes]
        self._host_busy.update(sources)  # no spill may overwrite them before the copies
        out = []
        for h, hb in zip(block_hashes, sources, strict=True):
            self._host.move_to_end(h)
            (b,) = self.allocate(1)
            self.block_hash[b] = h
            self._cached[h] = b
            self._restores.append((hb, b))
            out.append(b)
        self.num_restored += len(out)
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
        keep theirs) and every prefix of the host tier but those a queued restore still
        reads; returns how many cached blocks (both tiers) were forgotten."""
        before = len(self._cached) + len(self._host)
        for b in list(self._free):
            self._evict(b, spill=False)
        for h, hb in list(self._host.items()):
            if hb not in self._host_busy:
                del self._host[h]
                self._host_free.append(hb)
        return before - len(self._cached) - len(self._host)

    def _evict(self, b: int, spill: bool) -> None:
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            if self._cached.get(h) == b:
                del self._cached[h]
                if spill:
                    self._spill(b, h)

    def _spill(self, b: int, h: bytes) -> None:
        """Moves prefix ``h`` of device block ``b`` to the host tier (a copy queued),
        replacing the least recently used host entry no queued restore reads; nothing
        when it is there already or every host block is busy."""
        if h in self._host:
            self._host.move_to_end(h)
            return
        if self._host_free:
            hb = self._host_free.pop()
        else:
            victim = next((k for k, v in self._host.items() if v not in self._host_busy), None)
            if victim is None:
                return
            hb = self._host.pop(victim)
        self._host[h] = hb
        self._spills.append((b, hb))
        self.num_spilled += 1

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
        used = sorted(self._host.values())
        assert len(set(used)) == len(used), "two host entries share a host block"
        assert not set(used) & set(self._host_free), "a host block is both used and free"
        assert len(used) + len(self._host_free) == self.num_host_blocks
