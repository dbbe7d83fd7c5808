"""OpenAI-compatible request shapes (pydantic) and their translation to SamplingParams.

Validation happens here, at the edge: a request that parses is one the engine can run
(ranges, types, mutually exclusive fields); the engine still checks the prompt against
the model (length, vocabulary). Unknown fields are ignored, as OpenAI's server does.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling_params import SamplingParams

MAX_N = 16
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # Extras beyond OpenAI's API, as vLLM takes them.
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _stop_list(self) -> _Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop: at most 8 non-empty strings")
        return self

    def sampling_params(
        self, logprobs: int | None, default_max_tokens: int | None
    ) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("prompt: one prompt per request (send a list of one)")
            self.prompt = p[0]  # type: ignore[assignment]
        if self.echo:
            raise ValueError("echo is not supported")
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def to_params(self, default_max_tokens: int | None = 16) -> SamplingParams:
        return self.sampling_params(self.logprobs, default_max_tokens)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(
                        f"message content of type {part.get('type')!r} is not supported"
                    )
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(lp, default_max_tokens)


# --- response shapes -----------------------------------------------------------------
def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(item: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt = int(item["prompt_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(prompt, int(item["cached_tokens"]))},
    }


def kv_extension(item: dict[str, Any]) -> dict[str, Any]:
    """kvserve's per-request KV accounting (an extension field of the response): the
    decode (or only) instance, prompt tokens found in its prefix cache, and for a
    disaggregated request the prefill instance and the bytes and seconds of the
    transfer (only the prompt's blocks the decode instance had not cached move);
    ``mode`` is colocated, transferred, recomputed (prefill or transfer failed), local
    (no room to reserve, or little left to compute after prefix hits) or resumed (its
    first instance died; this one went on after ``resumed_tokens``; ``earlier`` holds
    the failed attempts' accounting). ``prefill_failures`` names prefill instances that
    failed the request (``prefill_retries`` of them were followed by another prefill
    instance).

    ``timing_ms`` splits the first token's latency (milliseconds, each within one
    process): ``api_first_delta`` from the API process opening the request to its first
    delta arriving there (``api_place``: until a core took it; ``api_parse``: the HTTP
    call's routing and body parsing before the opening); ``replica_first_delta`` from
    the engine replica taking the request to that delta leaving it, of which
    ``replica_queue`` before the engine took it and ``engine_ttft`` from then to the
    first token. What ``api_first_delta`` has beyond ``replica_first_delta`` is the
    link's wire and queueing time, both ways. ``replica_received_at`` is no duration
    but the request's arrival at the replica on its host's monotonic clock (ms;
    ``bench.loadgen`` on the same host turns it into the time outside the replica, in
    and out). ``api`` names the API replica that served the request."""
    acct = dict(item.get("kv") or {})
    acct.setdefault("mode", "colocated")
    acct["cached_tokens"] = int(item.get("cached_tokens", 0))
    acct["host_cached_tokens"] = int(item.get("host_cached_tokens", 0))
    return acct


def chat_logprobs(entries: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    k = body.top_logprobs or 0
    return {"content": [
        {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                          for t, lp in e["top"][:k]]}
        for e in entries
    ]}  # fmt: skip


def completion_logprobs(entries: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    k = body.logprobs or 0
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"][:k]) for e in entries],
        "text_offset": offsets,
    }
