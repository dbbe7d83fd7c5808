"""The global block manager's core: a ledger of every engine instance's KV capacity and
the reservations it grants. Pure Python, no Ray (``cluster/placement/ledger.py`` hosts it in an
actor); deterministic given its inputs and the ``now`` it is told.

It is a ledger, not an allocator. Instances report capacity and use; the ledger
chooses where a request goes and records a *reservation* of decode-side blocks with a
lease and a fencing token. The instance allocates the blocks itself when the transfer
arrives and reports back; the ledger reconciles:

- ``place``: the one placement policy. A decode instance (role ``decode`` or ``both``)
  whose free blocks (capacity − used − reserved) fit the request: the one holding the
  most of its prompt's leading blocks while its load is within a slack of the least
  loaded one's, else the least loaded; a prefill instance. Records a reservation. Each
  API process runs it over its own view (``cluster.api.cores``), fed by the cores'
  figures on its links; the ledger actor keeps the cluster's rows.
- ``confirm`` (the instance holds the blocks now: they leave ``reserved`` and count in the
  instance's next ``used`` report) and ``release`` (given back) need the reservation's
  fencing token: a stale holder, one whose lease ran out and whose blocks went to
  someone else, is refused.
- ``expire(now)`` drops reservations whose lease passed; ``remove_instance`` drops an
  instance and every reservation on it (a dead instance's blocks vanish with it).

Invariants (property-tested): per instance, ``reserved`` equals the blocks of its live
reservations, and a placement never makes ``used + reserved`` exceed ``capacity``;
fencing tokens only grow; no reservation refers to an unknown instance.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from cluster.placement.affinity import SLACK, leading_hits

ROLES = ("prefill", "decode", "both")


class LedgerError(ValueError):
    """A call the ledger refuses (unknown instance, stale token, bad figures)."""


@dataclass
class Instance:
    instance_id: str
    role: str
    tp: int
    block_size: int
    capacity: int
    used: int = 0
    reserved: int = 0
    running: int = 0
    waiting: int = 0
    prefix_hashes: frozenset[int] = frozenset()
    reported_at: float = 0.0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used - self.reserved)

    def serves(self, phase: str) -> bool:
        return self.role == phase or self.role == "both"


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    request_id: str
    instance_id: str
    blocks: int
    token: int  # fencing token: strictly increasing over the ledger's life
    expires_at: float


@dataclass(frozen=True)
class Placement:
    request_id: str
    prefill_id: str | None  # None: the decode instance's own prefill pool decides
    decode_id: str
    reservation: Reservation
    cached_blocks: int  # leading prompt blocks the decode instance already holds


@dataclass
class GlobalBlockManager:
    lease_s: float = 30.0
    instances: dict[str, Instance] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    _tokens: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- instances ------------------------------------------------------------------------
    def register(self, instance_id: str, role: str, tp: int, block_size: int, capacity: int,
                 now: float = 0.0) -> Instance:  # fmt: skip
        if role not in ROLES:
            raise LedgerError(f"role must be one of {ROLES}, got {role!r}")
        if tp < 1 or block_size < 1 or capacity < 0:
            raise LedgerError("tp and block_size must be >= 1 and capacity >= 0")
        old = self.instances.get(instance_id)
        inst = Instance(instance_id, role, tp, block_size, capacity, reported_at=now)
        if old is not None:  # re-registration (a restart): its old reservations are void
            self._drop_reservations_of(instance_id)
        self.instances[instance_id] = inst
        return inst

    def report(self, instance_id: str, used: int, running: int, waiting: int,
               prefix_hashes: frozenset[int] | None = None, now: float = 0.0) -> None:  # fmt: skip
        inst = self._instance(instance_id)
        if not 0 <= used <= inst.capacity or running < 0 or waiting < 0:
            raise LedgerError(f"bad report for {instance_id}: used={used} of {inst.capacity}")
        inst.used, inst.running, inst.waiting, inst.reported_at = used, running, waiting, now
        if prefix_hashes is not None:
            inst.prefix_hashes = frozenset(prefix_hashes)

    def remove_instance(self, instance_id: str) -> list[Reservation]:
        """Forgets a dead instance; returns the reservations that vanished with it."""
        self._instance(instance_id)
        gone = self._drop_reservations_of(instance_id)
        del self.instances[instance_id]
        return gone

    # --- placement ------------------------------------------------------------------------
    def place(self, request_id: str, num_blocks: int, prefix_hashes: Sequence[int] = (),
              now: float = 0.0, avoid: Collection[str] = (),
              slack: float = SLACK) -> Placement | None:  # fmt: skip
        """The one placement policy (every API process runs it over its own view).

        The decode instance: one that serves decode (role ``decode`` or ``both``),
        outside ``avoid``, whose free blocks fit the request's ``num_blocks`` less the
        leading blocks its prefix cache holds. Among those, the one holding the most
        leading blocks while its load (running + waiting) is at most the least load plus
        ``slack``; else the least loaded; ties by free fraction, then id. The prefill
        instance: the decode one itself when it serves both, else the prefill instance
        with the shortest queue, else None (the decode instance's own pool decides).
        Records a reservation of the blocks not cached (at least one: the prompt's
        last block and growth). None when no decode instance has room."""
        if num_blocks < 1:
            raise LedgerError("num_blocks must be >= 1")
        self.expire(now)
        fits: list[tuple[Instance, int]] = []
        for inst in self.instances.values():
            if not inst.serves("decode") or inst.instance_id in avoid:
                continue
            cached = min(leading_hits(prefix_hashes, inst.prefix_hashes), num_blocks - 1)
            if num_blocks - cached <= inst.free:
                fits.append((inst, cached))
        if not fits:
            return None

        def load(c: tuple[Instance, int]) -> int:
            return c[0].running + c[0].waiting

        def roomy(c: tuple[Instance, int]) -> tuple[float, str]:
            return (-c[0].free / max(1, c[0].capacity), c[0].instance_id)

        least = min(load(c) for c in fits)
        near = [c for c in fits if c[1] > 0 and load(c) <= least + slack]
        if near:
            decode, cached = min(near, key=lambda c: (-c[1], load(c), *roomy(c)))
        else:
            decode, cached = min(fits, key=lambda c: (load(c), *roomy(c)))
        prefill: Instance | None = decode
        if decode.role != "both":
            prefills = [i for i in self.instances.values() if i.role == "prefill"]
            prefill = min(prefills, key=lambda i: (i.waiting, i.running, i.instance_id),
                          default=None)  # fmt: skip
        res = Reservation(f"res-{request_id}-{next(self._tokens)}", request_id,
                          decode.instance_id, num_blocks - cached, next(self._tokens),
                          now + self.lease_s)  # fmt: skip
        self.reservations[res.reservation_id] = res
        decode.reserved += res.blocks
        return Placement(request_id, None if prefill is None else prefill.instance_id,
                         decode.instance_id, res, cached)  # fmt: skip

    def reserve_on(self, instance_id: str, request_id: str, num_blocks: int,
                   now: float = 0.0) -> Reservation | None:  # fmt: skip
        """Records a reservation of ``num_blocks`` on a decode instance that was chosen
        elsewhere (Serve's replica choice): None when the ledger sees no room there."""
        if num_blocks < 1:
            raise LedgerError("num_blocks must be >= 1")
        self.expire(now)
        inst = self._instance(instance_id)
        if not inst.serves("decode") or num_blocks > inst.free:
            return None
        res = Reservation(f"res-{request_id}-{next(self._tokens)}", request_id, instance_id,
                          num_blocks, next(self._tokens), now + self.lease_s)  # fmt: skip
        self.reservations[res.reservation_id] = res
        inst.reserved += res.blocks
        return res

    def confirm(self, reservation_id: str, token: int) -> None:
        """The decode instance allocated the blocks: the reservation ends, and the blocks
        are counted from the instance's next report (``used``)."""
        res = self._check(reservation_id, token)
        self._end(res)
        inst = self.instances[res.instance_id]
        inst.used = min(inst.capacity, inst.used + res.blocks)

    def release(self, reservation_id: str, token: int) -> None:
        """The request will not use the blocks (failed prefill, cancel): given back."""
        self._end(self._check(reservation_id, token))

    def renew(self, reservation_id: str, token: int, now: float) -> Reservation:
        res = self._check(reservation_id, token)
        new = Reservation(res.reservation_id, res.request_id, res.instance_id, res.blocks,
                          res.token, now + self.lease_s)  # fmt: skip
        self.reservations[res.reservation_id] = new
        return new

    def expire(self, now: float) -> list[Reservation]:
        gone = [r for r in self.reservations.values() if r.expires_at <= now]
        for r in gone:
            self._end(r)
        return gone

    # --- views ------------------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        return {
            "instances": len(self.instances),
            "capacity": sum(i.capacity for i in self.instances.values()),
            "used": sum(i.used for i in self.instances.values()),
            "reserved": sum(i.reserved for i in self.instances.values()),
            "reservations": len(self.reservations),
        }

    def check(self) -> None:
        """Raises AssertionError if an invariant is broken (tests call it)."""
        per: dict[str, int] = {}
        for r in self.reservations.values():
            assert r.instance_id in self.instances, f"{r} on an unknown instance"
            per[r.instance_id] = per.get(r.instance_id, 0) + r.blocks
        for inst in self.instances.values():
            assert inst.reserved == per.get(inst.instance_id, 0), inst
            assert inst.reserved >= 0 and 0 <= inst.used <= inst.capacity, inst

    # --- internals ----------------------------------------------------------------------------
    def _instance(self, instance_id: str) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise LedgerError(f"unknown instance {instance_id!r}")
        return inst

    def _check(self, reservation_id: str, token: int) -> Reservation:
        res = self.reservations.get(reservation_id)
        if res is None:
            raise LedgerError(f"reservation {reservation_id!r} is gone (expired or released)")
        if res.token != token:
            raise LedgerError(f"stale fencing token {token} for {reservation_id!r}")
        return res

    def _end(self, res: Reservation) -> None:
        del self.reservations[res.reservation_id]
        inst = self.instances.get(res.instance_id)
        if inst is not None:
            inst.reserved -= res.blocks

    def _drop_reservations_of(self, instance_id: str) -> list[Reservation]:
        gone = [r for r in self.reservations.values() if r.instance_id == instance_id]
        for r in gone:
            del self.reservations[r.reservation_id]
        return gone
