"""PairHealth: quarantine after repeated failures, probation, doubling, bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.pd.pairs import PairHealth


def test_quarantine_probation_and_doubling() -> None:
    h = PairHealth(max_failures=3, base_s=10, max_s=25)
    assert not h.failure("p", 0) and not h.failure("p", 1)
    assert h.failure("p", 2)  # third in a row
    assert h.is_quarantined("p", 11.9) and not h.is_quarantined("p", 12.0)
    assert h.quarantined(5) == ["p"] and h.quarantined(12) == []
    assert not h.failure("p", 5)  # during quarantine: not counted again
    assert h.failure("p", 13)  # probation: one failure is enough, 20 s now
    assert h.is_quarantined("p", 32.9) and not h.is_quarantined("p", 33)
    assert h.failure("p", 40)  # capped at max_s
    assert h.is_quarantined("p", 64.9) and not h.is_quarantined("p", 65)
    h.success("p")
    assert h.snapshot(70) == {} and not h.failure("p", 70)  # a fresh record
    assert h.quarantines_total == 3
    h.failure("q", 0)
    h.success("q")
    assert not h.failure("q", 1) and not h.failure("q", 2)  # successes reset the count


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError):
        PairHealth(max_failures=0)
    with pytest.raises(ValueError):
        PairHealth(base_s=10, max_s=5)


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans(),
                          st.floats(0, 50, allow_nan=False)), max_size=60))  # fmt: skip
def test_invariants(events: list[tuple[str, bool, float]]) -> None:
    h = PairHealth(max_failures=2, base_s=3, max_s=20)
    now = 0.0
    for peer, ok, dt in events:
        now += dt
        if ok:
            h.success(peer)
            assert not h.is_quarantined(peer, now) and peer not in h.snapshot(now)
        else:
            newly = h.failure(peer, now)
            if newly:
                assert h.is_quarantined(peer, now)
        for p, rec in h.snapshot(now).items():
            assert 0 <= rec["quarantined_s"] <= 20
            assert h.is_quarantined(p, now) == (rec["quarantined_s"] > 0)


def test_time_left_never_exceeds_cap_under_float_rounding() -> None:
    """(29.873 + 20) - 29.873 > 20 in floats; CI's hypothesis run found the like."""
    h = PairHealth(max_failures=1, base_s=20, max_s=20)
    assert h.failure("p", 29.873)
    assert h.snapshot(29.873)["p"]["quarantined_s"] == 20
