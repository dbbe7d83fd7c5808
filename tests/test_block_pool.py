"""Block pool and KV cache manager: exact block ids, eviction order, and a stateful
property test of the pool's invariants."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_hash import extend_block_hashes, hash_block
from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=16)


def test_allocate_takes_lowest_ids_first_and_free_returns_them() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.free([1, 0, 2])
    pool.check()
    assert pool.num_free_blocks == 4


def test_double_free_is_refused() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_chained_hash_depends_on_parent() -> None:
    a = hash_block(None, [1, 2])
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(a, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])
    assert hash_block(None, [1, 2], b"other-model") != a
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], block_size=2)
    assert len(hashes) == 2  # only full blocks


def test_prefix_hit_reuses_the_same_blocks() -> None:
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10)
    assert kv.block_table("a") == [0, 1, 2]
    b = make_request("b", [*range(8), 99, 98, 97])
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_table("b") == [0, 1, 3]
    assert kv.pool.ref_cnt[:4] == [2, 2, 1, 1]
    kv.free(a)
    kv.free(b)
    kv.pool.check()
    assert kv.pool.num_free_blocks == 8


def test_whole_prompt_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)))
    assert kv.find_cached_prefix(b) == [0]  # block 1 is recomputed to give logits


def test_eviction_order_unhashed_first_then_least_recent_tail_first() -> None:
    kv = KVCacheManager(BlockPool(6), block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])  # blocks 0, 1 full (hashed), 2 partial
    assert kv.allocate_slots(a, 5)
    kv.free(a)
    # Unhashed block 2 is reused first, then never-used 3, 4, 5, then a's tail (1) before its head (0).
    assert kv.pool.allocate(6) == [2, 3, 4, 5, 1, 0]
    assert kv.pool.num_cached_blocks == 0


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(BlockPool(3), block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    assert kv.allocate_slots(a, 4)
    b = make_request("b", [7, 8, 9, 10])
    assert not kv.allocate_slots(b, 4)
    assert kv.block_table("b") == []
    assert kv.pool.num_free_blocks == 1
    kv.pool.check()


class PoolMachine(RuleBasedStateMachine):
    """Requests with overlapping prefixes come and go; the pool stays consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(BlockPool(12), block_size=2)
        self.live: dict[str, Request] = {}
        self.counter = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2], [1, 2, 3, 4], [5, 6, 7, 8]]),
        tail=st.lists(st.integers(0, 9), max_size=5),
    )
    def admit(self, prefix: list[int], tail: list[int]) -> None:
        tokens = prefix + tail
        if not tokens:
            return
        self.counter += 1
        req = make_request(f"r{self.counter}", tokens)
        hits = self.kv.find_cached_prefix(req)
        hit_hashes = [self.kv.pool.block_hash[b] for b in hits]
        free_before = self.kv.pool.num_free_blocks
        if self.kv.allocate_slots(req, len(tokens) - len(hits) * 2, hits):
            table = self.kv.block_table(req.request_id)
            assert table[: len(hits)] == hits
            # A hit returns the very blocks that hold those prefixes.
            assert hit_hashes == req.block_hashes[: len(hits)]
            self.live[req.request_id] = req
        else:
            assert self.kv.pool.num_free_blocks == free_before

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        req.num_computed_tokens = req.num_tokens
        req.append_output_token(data.draw(st.integers(0, 9)))
        if not self.kv.allocate_slots(req, 1):
            self.kv.free(req)
            del self.live[rid]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(self.live.pop(rid))

    @rule()
    def reset_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        pool = self.kv.pool
        pool.check()
        referenced = sum(len(self.kv.block_table(r)) for r in self.live)
        assert sum(pool.ref_cnt) == referenced
        assert pool.num_free_blocks + sum(1 for c in pool.ref_cnt if c > 0) == pool.num_blocks
        for rid in self.live:
            assert all(pool.ref_cnt[b] > 0 for b in self.kv.block_table(rid))


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# --- the host tier -----------------------------------------------------------------------
def test_an_evicted_prefix_spills_to_the_host_and_a_hit_restores_it() -> None:
    kv = KVCacheManager(BlockPool(4, num_host_blocks=4), block_size=2)
    a = make_request("a", [1, 2, 3, 4, 9])
    assert kv.allocate_slots(a, 5)
    kv.free(a)  # blocks [0, 1] cached, 2 free
    assert kv.pool.take_copies() == ([], [])
    b = make_request("b", [5, 6, 7, 8, 9, 9, 9])
    assert kv.allocate_slots(b, 7)  # takes all 4: evicts a's two cached blocks
    spills, restores = kv.pool.take_copies()
    assert sorted(spills) == [(0, 1), (1, 0)] and restores == []  # tail block first
    kv.free(b)
    a2 = make_request("a2", [1, 2, 3, 4, 7])
    hits = kv.find_cached_prefix(a2)
    assert hits == [None, None]  # both on the host tier
    assert kv.allocate_slots(a2, 1, hits)
    spills, restores = kv.pool.take_copies()
    table = kv.block_table("a2")
    assert sorted(restores) == sorted([(1, table[0]), (0, table[1])])
    # b's cached blocks taken for a2 spilled into fresh host blocks, never into the
    # two the restores read.
    assert sorted(spills) == [(1, 2), (3, 3)]
    kv.pool.check()


class HostTierMachine(RuleBasedStateMachine):
    """Requests with overlapping prefixes come and go on a small pool with a smaller
    host tier. A model of both memories applies each step's copies (spills, then
    restores) and writes fresh blocks: every cached prefix, on either tier, must hold
    the data its hash names, and every hit a request takes must read its own tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(BlockPool(10, num_host_blocks=6), block_size=2)
        self.live: dict[str, Request] = {}
        self.dev: dict[int, object] = {}
        self.host: dict[int, object] = {}
        self.counter = 0

    def _step(self, req: Request, first_new: int) -> None:
        """The step: copies, then the forward writes blocks ``first_new`` on of ``req``."""
        spills, restores = self.kv.pool.take_copies()
        for d, hb in spills:
            self.host[hb] = self.dev.get(d)
        for hb, d in restores:
            self.dev[d] = self.host.get(hb)
        table = self.kv.block_table(req.request_id)
        for i in range(len(table)):
            full = (i + 1) * 2 <= req.num_tokens
            if i < first_new:
                if full:
                    assert self.dev.get(table[i]) == req.block_hashes[i], "a hit read wrong K/V"
                continue
            self.dev[table[i]] = req.block_hashes[i] if full else ("partial", req.request_id)

    @rule(
        prefix=st.sampled_from([[], [1, 2], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]),
        tail=st.lists(st.integers(0, 9), max_size=5),
    )
    def admit(self, prefix: list[int], tail: list[int]) -> None:
        tokens = prefix + tail
        if not tokens:
            return
        self.counter += 1
        req = make_request(f"r{self.counter}", tokens)
        hits = self.kv.find_cached_prefix(req)
        if self.kv.allocate_slots(req, len(tokens) - len(hits) * 2, hits):
            self.live[req.request_id] = req
            extend_block_hashes(req.block_hashes, req.all_token_ids, 2, b"")
            self._step(req, len(hits))
        else:
            assert self.kv.pool.take_copies() == ([], [])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        have = len(self.kv.block_table(rid))
        req.num_computed_tokens = req.num_tokens
        req.append_output_token(data.draw(st.integers(0, 9)))
        if not self.kv.allocate_slots(req, 1):
            self.kv.free(req)
            del self.live[rid]
            return
        extend_block_hashes(req.block_hashes, req.all_token_ids, 2, b"")
        self._step(req, have - 1)  # the last block gets the new token

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(self.live.pop(rid))

    @rule(tokens=st.sampled_from([[1, 2, 3, 4, 5], [5, 6, 7, 8, 0]]))
    def transfer(self, tokens: list[int]) -> None:
        """A KV transfer's blocks are written outside a step: no copy may be queued."""
        self.counter += 1
        req = make_request(f"x{self.counter}", tokens)
        hits = self.kv.find_cached_prefix(req, host=False)
        assert None not in hits
        fresh = self.kv.allocate_for_transfer(req, len(tokens), hits)
        assert self.kv.pool.take_copies() == ([], [])
        if fresh is None:
            return
        extend_block_hashes(req.block_hashes, req.all_token_ids, 2, b"")
        self.live[req.request_id] = req
        self._step(req, len(hits))  # the transfer lands
        self.kv.commit_transfer(req, len(tokens))

    @rule()
    def reset_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        pool = self.kv.pool
        pool.check()
        assert sum(pool.ref_cnt) == sum(len(self.kv.block_table(r)) for r in self.live)
        for h in pool.cached_hashes():
            b = pool.lookup(h)
            assert b is not None and self.dev.get(b) == h, "a device prefix holds other K/V"
        for h, hb in pool._host.items():
            assert self.host.get(hb) == h, "a host prefix holds other K/V"


TestHostTierMachine = HostTierMachine.TestCase
TestHostTierMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
