"""What goes between an API process and an engine core, and what a failed exchange
raises on the API's side. Torch-free.

Frames (``cluster.core.transport``) carry tuples:

- API → core: ``("add", req)`` (``req``: ``request_id``, ``prompt`` or ``prompt_ids``
  or ``messages``, ``params``: ``SamplingParams``; a failover adds ``resume`` and
  ``resume_text``); ``("abort", request_id)``.
- core → API: ``("ready", info, stats)`` once (``info``: model, role, context, block
  size, prefix key, instance); ``("added", request_id, refused)`` (None, ``"full: ..."``
  or ``"gone: ..."``); ``("out", deltas, stats, hashes | None)`` per step with output
  for this link (at least every second): ``deltas`` as ``cluster.replica`` documents
  them, ``stats`` the core's figures, ``hashes`` its prefix-cache blocks (short form)
  about once a second.
"""

from __future__ import annotations

ADD, ABORT = "add", "abort"  # API → core: the kinds of message
READY, ADDED, OUT = "ready", "added", "out"  # core → API
FULL, GONE = "full: ", "gone: "  # the prefixes of a refusal: HTTP 429, or try another core


class EngineGone(RuntimeError):
    """The core serving a request failed, or the link to it broke (HTTP 503; the API
    resumes the request on another core)."""


class PoolFull(RuntimeError):
    """The core refused a new request: its queue is full (HTTP 429, retry shortly)."""
