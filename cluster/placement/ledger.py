"""The instance ledger: one named Ray actor every engine instance reports to.

Each pool replica reports its engine's figures (role, TP, blocks used/free, running,
waiting, prefix-cache counters) about once a second; ``instances()`` returns the live
ones, dropping an instance not heard from within ``stale_s``. ``kvserve status`` reads
it. The global block manager of the disaggregated pools grows from this ledger: it is
a record of what instances say, never an allocator of their blocks.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from cluster.placement.block_manager import GlobalBlockManager
from engine.kv_budget import demand_blocks

LEDGER_NAME = "kvserve-ledger"
NAMESPACE = "kvserve"
# An instance is up while it reported itself alive within this many seconds (it reports
# about once a second; see cluster.replica).
FRESH_S = 5.0


class InstanceLedger:
    def __init__(self, stale_s: float = 10.0) -> None:
        self.stale_s = stale_s
        self._instances: dict[str, dict[str, Any]] = {}
        # The block ledger the placements of the disaggregated pools will use.
        self.blocks = GlobalBlockManager()

    def report(self, instance_id: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        self._instances[instance_id] = {**info, "instance_id": instance_id, "reported_at": now}
        known = self.blocks.instances.get(instance_id)
        capacity = int(info.get("num_blocks", 0))
        if known is None or known.capacity != capacity:
            self.blocks.register(instance_id, str(info.get("role", "both")), int(info.get("tp", 1)),
                                 int(info.get("block_size", 16)), capacity, now=now)  # fmt: skip
        used = demand_blocks(capacity, int(info.get("free_blocks", capacity)),
                             int(info.get("projected_blocks", 0)))  # fmt: skip
        self.blocks.report(instance_id, used, int(info.get("running", 0)),
                           int(info.get("waiting", 0)), now=now)  # fmt: skip

    def reserve(self, instance_id: str, request_id: str, num_blocks: int) -> tuple[str, int] | None:
        """A decode instance took ``num_blocks`` for a transfer: (reservation id, fencing
        token), or None if the instance is unknown to the ledger or full in its view."""
        if instance_id not in self.blocks.instances:
            return None
        res = self.blocks.reserve_on(instance_id, request_id, num_blocks, time.monotonic())
        return None if res is None else (res.reservation_id, res.token)

    def settle(self, reservation_id: str, token: int, used: bool) -> bool:
        """Ends a reservation: the K/V landed (``used``: confirm) or not (release).
        False when it was gone already (lease ran out, instance forgotten)."""
        from cluster.placement.block_manager import LedgerError

        try:
            if used:
                self.blocks.confirm(reservation_id, token)
            else:
                self.blocks.release(reservation_id, token)
        except LedgerError:
            return False
        return True

    def forget(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)
        if instance_id in self.blocks.instances:
            self.blocks.remove_instance(instance_id)

    def totals(self) -> dict[str, int]:
        """Capacity, used and reserved blocks over the live instances (the ledger's view)."""
        self.instances()
        return self.blocks.totals()

    def instances(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        live = {k: v for k, v in self._instances.items() if now - v["reported_at"] < self.stale_s}
        for gone in set(self._instances) - set(live):
            if gone in self.blocks.instances:
                self.blocks.remove_instance(gone)  # a silent instance's reservations vanish
        self._instances = live
        return sorted(
            ({**v, "age_s": now - v["reported_at"]} for v in live.values()),
            key=lambda v: str(v["instance_id"]),
        )


def up(
    rows: list[dict[str, Any]],
    model: str,
    roles: tuple[str, ...],
    exclude: tuple[str, ...] | list[str] = (),
) -> list[dict[str, Any]]:
    """The rows of ``instances()`` that serve ``model`` in one of ``roles``, are alive by
    their last report (not ``dead``, younger than ``FRESH_S``) and not in ``exclude``."""
    return [r for r in rows if r.get("model") == model and r.get("role") in roles
            and not r.get("dead") and float(r.get("age_s", FRESH_S)) < FRESH_S
            and r.get("instance_id") not in exclude]  # fmt: skip


def get_ledger() -> Any:
    """The cluster's ledger actor, created on first use (detached: it outlives replicas).

    Scheduled outside any placement group: a replica with ``placement_group_bundles``
    (TP > 1) captures its children into its group by default, and Ray kills every actor
    of a group when the group goes, detached or not; the ledger would die with the first
    such replica that stops."""
    cls: Any = ray.remote(num_cpus=0)(InstanceLedger)
    return cls.options(name=LEDGER_NAME, namespace=NAMESPACE, lifetime="detached",
                       get_if_exists=True, scheduling_strategy="DEFAULT").remote()  # fmt: skip
