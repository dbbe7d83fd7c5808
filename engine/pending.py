"""Tokens a step takes from the previous step's device output (async scheduling).

With async scheduling the engine schedules step N+1 while step N runs, so a request
that step N samples enters step N+1 with its token id ``PENDING``; N's greedy tokens
never leave the device before N+1 reads them. These helpers put them in place, queued
on the device behind step N (no host sync).
"""

from __future__ import annotations

import torch

from engine.scheduler_output import SchedulerOutput


def pending_rows(out: SchedulerOutput) -> list[int]:
    """Rows of the flattened batch whose token id is ``PENDING``, in batch order."""
    rows, row = [], 0
    for s in out.scheduled:
        row += s.num_new_tokens
        if s.pending:
            rows.append(row - 1)
    return rows


def fill_pending(
    input_ids: torch.Tensor, out: SchedulerOutput, prev_tokens: torch.Tensor | None
) -> None:
    """Writes the previous step's device tokens over ``input_ids``' ``PENDING`` rows
    (queued on the device: no host sync)."""
    if not out.pending_sources:
        return
    assert prev_tokens is not None, "PENDING tokens need the previous step's tokens"
    dev = input_ids.device
    dst = torch.tensor(pending_rows(out), dtype=torch.long).to(dev, non_blocking=True)
    src = torch.tensor(out.pending_sources, dtype=torch.long).to(dev, non_blocking=True)
    input_ids.index_copy_(0, dst, prev_tokens.index_select(0, src))
