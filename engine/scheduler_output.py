"""The scheduler's plain description of one step: ints and lists, no tensors.

It is everything a model runner (in this process or a tensor-parallel rank
elsewhere) needs to build the step's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A token id the scheduler does not know yet: sampled on the device by the step still
# running (async scheduling); the runner takes it from that step's tokens.
PENDING = -1


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    # Tokens whose K/V this step computes: all_token_ids[start_pos : start_pos + len];
    # ``[PENDING]`` for a request whose next token the running step is still sampling.
    token_ids: list[int]
    # num_computed_tokens before the step (prefix-cache hits included).
    start_pos: int
    # The request's whole block table after this step's allocation (empty without cache).
    block_ids: list[int]
    # True when the step reaches the request's last token, so a token is sampled.
    needs_sample: bool

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def pending(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PENDING


@dataclass(slots=True)
class SchedulerOutput:
    # Requests of this step, in batch order (rows of the flattened batch follow it).
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests preempted in this step (their blocks are already back in the pool).
    preempted: list[str] = field(default_factory=list)
    # Sum of num_new_tokens; never above max_num_batched_tokens.
    num_batched_tokens: int = 0
    # False in recompute mode (kv_cache=False): no cache reads or writes.
    use_cache: bool = True
    # Per ``PENDING`` token, in batch order: its row among the previous step's sampled
    # tokens (set by the engine, which holds them on the device).
    pending_sources: list[int] = field(default_factory=list)
    # Host-tier copies to run before the step's forward, spills first (``BlockPool``):
    # (device block, host block) and (host block, device block).
    spills: list[tuple[int, int]] = field(default_factory=list)
    restores: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute and nothing to copy."""
        return not self.scheduled and not self.spills and not self.restores
