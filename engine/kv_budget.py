"""The KV arithmetic every part of kvserve shares: blocks a request holds and will hold.

Pure Python. A request is *committed* to the blocks in its table and *projected* to
need the blocks of every token it may still get: up to ``prompt + max_tokens`` when the
caller bounded it, else (unbounded) the tokens it has plus ``reserve`` more (a rolling
watermark, as the grown request asks again next step); never past ``max_model_len``::

    blocks_needed(request) = ceil(projected_tokens / block_size) - len(block table)

The scheduler admits a request only while the free blocks cover every admitted
request's ``blocks_needed`` (``SchedulerConfig.kv_admission = "projected"``), so a
load at the plan never preempts. ``kvserve plan`` counts sessions with ``sessions``;
engines report the projected blocks (``engine_stats``) and the ledger and the
autoscaling signal count them as used.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def projected_tokens(num_prompt: int, max_tokens: int | None, num_tokens: int,
                     max_model_len: int, reserve: int) -> int:  # fmt: skip
    """The most tokens a request will hold: ``num_prompt + max_tokens`` when bounded,
    else ``num_tokens`` (what it has, a token in flight included) + ``reserve``;
    at most ``max_model_len`` and at least ``num_tokens``."""
    end = num_prompt + max_tokens if max_tokens is not None else num_tokens + reserve
    return max(num_tokens, min(end, max_model_len))


def demand_blocks(num_blocks: int, free_blocks: int, projected_blocks: int) -> int:
    """Blocks an instance has given out: held by requests, plus the decode blocks its
    admitted requests may still take (what the ledger and autoscaling count as used)."""
    return min(num_blocks, max(0, num_blocks - free_blocks + projected_blocks))


def sessions(num_blocks: int, block_size: int, session_tokens: int) -> int:
    """Whole sessions of ``session_tokens`` a pool of ``num_blocks`` holds, each rounded
    up to whole blocks (what projected admission admits)."""
    return num_blocks // blocks_for(session_tokens, block_size)
