"""What the engine hands back: one ``RequestOutput`` per request, vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request (``index`` in ``[0, n)``); fields are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (running)
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    cumulative_logprob: float | None = None
    # One dict per generated token: token id -> logprob (sampled token + top-N).
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Prompt tokens whose K/V came from the prefix cache (first admission).
    num_cached_tokens: int = 0
    # Of which restored from the host tier (copied back, not recomputed).
    num_host_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Prefill-only requests (disaggregated): the blocks holding the prompt's K/V, kept
    # until ``LLMEngine.release_kv``.
    kv_block_ids: list[int] | None = None
