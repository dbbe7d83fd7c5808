"""A request's state inside one engine instance: pure Python, no tensors."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks allocated, K/V coming from a prefill instance
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` string, or None while unfinished."""
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}


class Request:
    """One sequence being generated.

    ``all_token_ids = prompt_token_ids + output_token_ids``. The scheduler advances
    ``num_computed_tokens`` (tokens whose K/V are in the cache); a request needs a
    new token sampled when ``num_computed_tokens == num_tokens``. A request with
    ``n > 1`` is fanned out into ``n`` of these that share the prompt through the
    prefix cache; ``sample_index`` tells them apart.
    """

    __slots__ = (
        "all_token_ids",
        "block_hashes",
        "cumulative_logprob",
        "hold_kv",
        "logprobs",
        "max_tokens",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_host_cached_tokens",
        "num_pending",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "parent_id",
        "prompt",
        "request_id",
        "sample_index",
        "sampling_params",
        "status",
        "stop_reason",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        prompt: str | None = None,
        parent_id: str | None = None,
        sample_index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.sample_index = sample_index
        self.prompt = prompt
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # Tokens sampled on the device by a step still running, not yet appended
        # (async scheduling): the next step may already compute them (``PENDING``).
        self.num_pending = 0
        # Prompt tokens found in the prefix cache on first admission.
        self.num_cached_tokens = -1
        self.num_host_cached_tokens = 0  # of which restored from the host tier
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Chained hashes of this request's full blocks, grown as tokens arrive.
        self.block_hashes: list[bytes] = []
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        # Prefill-only (disaggregated): on finishing, keep the blocks until released.
        self.hold_kv = False

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
