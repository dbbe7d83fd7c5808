"""The global block manager's ledger: placement rules, fencing, leases, dead instances,
and a hypothesis state machine over all of it checking the invariants."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.placement.block_manager import GlobalBlockManager, LedgerError


def _ledger() -> GlobalBlockManager:
    g = GlobalBlockManager(lease_s=10)
    g.register("p0", "prefill", 1, 16, 100)
    g.register("d0", "decode", 1, 16, 100)
    g.register("d1", "decode", 2, 16, 100)
    return g


def test_placement_prefers_prefix_affinity_then_free_blocks() -> None:
    g = _ledger()
    g.report("d0", used=60, running=3, waiting=0, prefix_hashes=frozenset({11, 12, 13}))
    g.report("d1", used=10, running=1, waiting=0)
    hit = g.place("a", 8, prefix_hashes=(11, 12, 13, 14))
    assert hit is not None and hit.decode_id == "d0" and hit.cached_blocks == 3
    assert hit.reservation.blocks == 5 and hit.prefill_id == "p0"
    cold = g.place("b", 8, prefix_hashes=(99,))
    assert cold is not None and cold.decode_id == "d1"  # the least loaded
    # The prefix holder loses its pull once it is busier than the least loaded + slack.
    g.report("d0", used=60, running=10, waiting=0, prefix_hashes=frozenset({11, 12, 13}))
    busy = g.place("c", 8, prefix_hashes=(11, 12, 13, 14), slack=8)
    assert busy is not None and busy.decode_id == "d1" and busy.cached_blocks == 0
    assert g.place("d", 8, avoid=("d1",)) is not None  # d1 avoided: d0 (it has room)
    both = GlobalBlockManager()
    both.register("b0", "both", 1, 16, 10)
    p = both.place("e", 2)
    assert p is not None and p.prefill_id == p.decode_id == "b0"  # colocated: itself
    g.check()


def test_no_room_gives_none_and_capacity_is_never_oversold() -> None:
    g = _ledger()
    g.report("d0", used=95, running=1, waiting=0)
    g.report("d1", used=95, running=1, waiting=0)
    assert g.place("big", 6) is None
    first = g.place("x", 5)
    assert first is not None
    second = g.place("y", 5)
    assert second is not None and second.decode_id != first.decode_id
    assert g.place("z", 1) is None  # both instances full: used + reserved == capacity
    g.check()


def test_fencing_tokens_and_leases() -> None:
    g = _ledger()
    p = g.place("r", 4, now=0.0)
    assert p is not None
    with pytest.raises(LedgerError, match="stale fencing token"):
        g.confirm(p.reservation.reservation_id, p.reservation.token + 1)
    assert g.expire(now=10.0) == [p.reservation]  # the lease ran out
    with pytest.raises(LedgerError, match="is gone"):
        g.confirm(p.reservation.reservation_id, p.reservation.token)
    q = g.place("r2", 4, now=11.0)
    assert q is not None and q.reservation.token > p.reservation.token
    g.renew(q.reservation.reservation_id, q.reservation.token, now=15.0)
    assert g.expire(now=20.0) == []
    g.confirm(q.reservation.reservation_id, q.reservation.token)
    assert g.totals()["reserved"] == 0 and g.instances[q.decode_id].used == 4
    g.check()


def test_dead_instance_takes_its_reservations() -> None:
    g = _ledger()
    p = g.place("r", 4)
    assert p is not None
    gone = g.remove_instance(p.decode_id)
    assert gone == [p.reservation] and g.totals()["reservations"] == 0
    with pytest.raises(LedgerError):
        g.release(p.reservation.reservation_id, p.reservation.token)
    g.check()


def test_bad_calls_are_refused() -> None:
    g = _ledger()
    with pytest.raises(LedgerError, match="role"):
        g.register("x", "router", 1, 16, 10)
    with pytest.raises(LedgerError, match="unknown instance"):
        g.report("nope", 0, 0, 0)
    with pytest.raises(LedgerError, match="bad report"):
        g.report("d0", used=101, running=0, waiting=0)


IDS = ["p0", "p1", "d0", "d1", "b0"]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.g = GlobalBlockManager(lease_s=5)
        self.now = 0.0
        self.held: list[tuple[str, int]] = []  # (reservation id, token) handed out
        self.last_token = 0
        self.n = 0

    @rule(i=st.sampled_from(IDS), cap=st.integers(0, 64))
    def register(self, i: str, cap: int) -> None:
        role = {"p": "prefill", "d": "decode", "b": "both"}[i[0]]
        self.g.register(i, role, 1, 16, cap, now=self.now)

    @rule(i=st.sampled_from(IDS), frac=st.floats(0, 1), run=st.integers(0, 8), wait=st.integers(0, 8),
          hashes=st.frozensets(st.integers(0, 6), max_size=4))  # fmt: skip
    def report(self, i: str, frac: float, run: int, wait: int, hashes: frozenset[int]) -> None:
        inst = self.g.instances.get(i)
        if inst is None:
            return
        self.g.report(i, int(frac * inst.capacity), run, wait, hashes, now=self.now)

    @rule(blocks=st.integers(1, 20), hashes=st.lists(st.integers(0, 6), max_size=4))
    def place(self, blocks: int, hashes: list[int]) -> None:
        self.n += 1
        p = self.g.place(f"r{self.n}", blocks, tuple(hashes), now=self.now)
        if p is None:
            return
        inst = self.g.instances[p.decode_id]
        assert inst.serves("decode")
        assert p.prefill_id is None or self.g.instances[p.prefill_id].serves("prefill")
        assert inst.used + inst.reserved <= inst.capacity  # never oversold
        assert p.reservation.blocks + p.cached_blocks == blocks
        assert p.reservation.token > self.last_token
        self.last_token = p.reservation.token
        self.held.append((p.reservation.reservation_id, p.reservation.token))

    @rule(i=st.sampled_from(IDS), blocks=st.integers(1, 20))
    def reserve_on(self, i: str, blocks: int) -> None:
        """A reservation on an instance Serve chose: granted only on a decode-capable
        instance with room in the ledger's view."""
        inst = self.g.instances.get(i)
        if inst is None:
            return
        self.n += 1
        res = self.g.reserve_on(i, f"r{self.n}", blocks, now=self.now)
        if res is None:
            assert not inst.serves("decode") or blocks > self.g.instances[i].free
            return
        assert inst.serves("decode")
        assert inst.used + inst.reserved <= inst.capacity
        assert res.token > self.last_token
        self.last_token = res.token
        self.held.append((res.reservation_id, res.token))

    @precondition(lambda self: self.held)
    @rule(k=st.integers(0, 100), how=st.sampled_from(["confirm", "release", "stale"]))
    def settle(self, k: int, how: str) -> None:
        rid, token = self.held.pop(k % len(self.held))
        live = rid in self.g.reservations
        try:
            if how == "stale":
                self.g.confirm(rid, token + 1)
                raise AssertionError("a stale token was accepted")
            getattr(self.g, how)(rid, token)
            assert live
        except LedgerError:
            assert how == "stale" or not live

    @rule(dt=st.floats(0, 4))
    def tick(self, dt: float) -> None:
        self.now += dt
        for r in self.g.expire(self.now):
            assert r.expires_at <= self.now

    @precondition(lambda self: self.g.instances)
    @rule(k=st.integers(0, 100))
    def kill(self, k: int) -> None:
        victim = sorted(self.g.instances)[k % len(self.g.instances)]
        gone = self.g.remove_instance(victim)
        assert all(r.instance_id == victim for r in gone)
        assert all(r.instance_id != victim for r in self.g.reservations.values())

    @invariant()
    def consistent(self) -> None:
        self.g.check()


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_ledger_state_machine = LedgerMachine.TestCase
