"""Health of the (decode replica, prefill replica) pairs a decode replica works with.

Each transfer (or prefill) through a pair ends in ``success`` or ``failure``. A pair
with ``max_failures`` failures in a row is quarantined for ``base_s`` seconds; while
quarantined, the decode replica steers its prefills away from that peer and does not
use the pair (the request runs locally instead of waiting on a link that keeps
failing). When the quarantine ends the pair is on probation: its link is rebuilt
(the next transfer gets a fresh communicator), one success clears the record, one
more failure quarantines it again for twice as long (at most ``max_s``).

Pure Python, no clock of its own: callers pass ``now`` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: int = 0  # in a row
    quarantines: int = 0  # in a row (doubles the next one)
    until: float = 0.0  # quarantined while now < until
    probation: bool = False


class PairHealth:
    def __init__(self, max_failures: int = 3, base_s: float = 10.0, max_s: float = 300.0) -> None:
        if max_failures < 1 or base_s <= 0 or max_s < base_s:
            raise ValueError("need max_failures >= 1 and 0 < base_s <= max_s")
        self.max_failures = max_failures
        self.base_s = base_s
        self.max_s = max_s
        self._pairs: dict[str, _Record] = {}
        self.quarantines_total = 0

    def success(self, peer: str) -> None:
        self._pairs.pop(peer, None)

    def failure(self, peer: str, now: float) -> bool:
        """Records a failure; True when it (newly) quarantines the pair."""
        rec = self._pairs.setdefault(peer, _Record())
        if now < rec.until:
            return False  # already quarantined (a transfer that started before)
        rec.failures += 1
        if rec.probation or rec.failures >= self.max_failures:
            rec.until = now + min(self.base_s * 2**rec.quarantines, self.max_s)
            rec.quarantines += 1
            rec.failures = 0
            rec.probation = True
            self.quarantines_total += 1
            return True
        return False

    def is_quarantined(self, peer: str, now: float) -> bool:
        rec = self._pairs.get(peer)
        return rec is not None and now < rec.until

    def quarantined(self, now: float) -> list[str]:
        """The peers quarantined at ``now``."""
        return sorted(p for p, r in self._pairs.items() if now < r.until)

    def snapshot(self, now: float) -> dict[str, dict[str, float]]:
        """Per peer with a record: failures in a row, seconds of quarantine left (0..max_s)."""
        return {
            p: {
                "failures": r.failures,
                "quarantined_s": min(max(r.until - now, 0.0), self.max_s),  # float rounding
                "quarantines": r.quarantines,
            }
            for p, r in self._pairs.items()
        }
