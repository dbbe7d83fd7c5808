"""What goes between an API process and an engine core, and what a failed exchange
raises on the API's side. Torch-free.

A link carries these messages (``cluster.core.transport`` moves them: pickled frames
over TCP, or copies between two ends in one process):

- API → core: ``Add`` (a ``Request``), ``Abort`` (a request id), ``Reset`` (empty the
  prefix cache);
- core → API: ``Ready`` once (what the core is, its figures); ``ResetDone`` per
  ``Reset``; ``Added`` per ``Add``
  (``refused``: None, ``"full: ..."`` or ``"gone: ..."``); ``Out`` per engine step with
  output for this link, and at least every second: the step's ``Delta`` of each request
  of this link (what is new since its previous delta), the core's figures, and about
  once a second its prefix-cache blocks (short hashes).

A request's output is made into deltas once, on the core (``cluster.relay``), and
crosses the link once; the API process only renders them (SSE, JSON, protobuf).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypedDict

from engine.sampling_params import SamplingParams

FULL, GONE = "full: ", "gone: "  # the prefixes of a refusal: HTTP 429, or try another core


class Request(TypedDict, total=False):
    """A request as an API process sends it: ``request_id``, ``params``, and one of
    ``prompt`` (text), ``prompt_ids`` (tokenized by the API: prefix affinity) or
    ``messages`` (chat); a failover adds ``resume`` (the tokens the client has) and
    ``resume_text`` (the length of their text). The ``*_at`` stamps time its way."""

    request_id: str
    params: SamplingParams
    prompt: str | list[int]
    prompt_ids: list[int]
    messages: list[dict[str, Any]]
    resume: list[int]
    resume_text: int
    submitted_at: float  # the core's clock: when it took the request
    api_arrived_at: float | None  # the API's clock: when the HTTP call reached the app


class Choice(TypedDict):
    """What is new for one sample: text, tokens, their logprobs, and why it finished."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None
    finish_reason: str | None


class Delta(TypedDict, total=False):
    """One request's output of one step: its ``choices`` with something new, the
    prompt's size and prefix hits, ``finished`` on the last; ``kv`` its KV accounting
    (instance, mode, transfer, timing; ``docs/serving.md``). Or, instead, ``error``
    (bad input: HTTP 400) or ``gone`` (its engine failed: resume elsewhere)."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    host_cached_tokens: int  # of which restored from the host tier
    finished: bool
    choices: list[Choice]
    kv: dict[str, Any]
    error: str
    gone: str


class Add(NamedTuple):
    req: Request


class Abort(NamedTuple):
    request_id: str


class Reset(NamedTuple):
    """Empty the core's prefix cache of the blocks no request holds."""

    token: str  # names the answer


class ResetDone(NamedTuple):
    token: str
    forgotten: dict[str, int]  # per instance reset (a decode core resets its prefill pool)
    error: str | None  # why the core's own engine could not reset


class Ready(NamedTuple):
    info: dict[str, Any]  # model, role, context, block size, prefix key, instance
    stats: dict[str, Any]


class Added(NamedTuple):
    request_id: str
    refused: str | None


class Out(NamedTuple):
    deltas: list[Delta]
    stats: dict[str, Any]
    hashes: list[int] | None


Message = Add | Abort | Reset | Ready | Added | ResetDone | Out


class EngineGone(RuntimeError):
    """The core serving a request failed, or the link to it broke (HTTP 503; the API
    resumes the request on another core)."""


class PoolFull(RuntimeError):
    """The core refused a new request: its queue is full (HTTP 429, retry shortly)."""
