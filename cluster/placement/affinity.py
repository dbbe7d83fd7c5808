"""Prefix-cache affinity: send a request to the engine replica that already holds the
K/V of its prompt's leading blocks.

- Engine replicas report the blocks in their prefix cache (``record_routing_stats``:
  ``prefix``, the ``short`` form of the chained block hashes, the newest
  ``REPORT_MAX``), about once a second.
- The router hashes each new prompt's leading full blocks the same way
  (``PromptHasher``: the engine's tokenizer, chat template, block size and hash key,
  which it learns from a replica's ``info``).
- The request router counts, per replica, how many leading blocks of the prompt the
  replica holds (``leading_hits``). ``rank`` puts the replica with the most hits first
  while its load is within ``SLACK`` requests of the least loaded one; otherwise the
  least loaded replica goes first, as without affinity.

Affinity only orders the candidates. A stale or missing report costs a cache miss,
never a wrong answer: the engine looks up its own cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from engine.block_hash import extend_block_hashes

REPORT_MAX = 4096  # cached block hashes a replica reports
MAX_BLOCKS = 64  # leading blocks of a prompt that are hashed for routing
# A replica holding the prompt's prefix is preferred while its load (running + waiting
# requests) is at most the least loaded replica's plus this.
SLACK = 8.0

T = TypeVar("T")


def short(block_hash: bytes) -> int:
    """A block hash as a signed 64-bit int (what replicas report and routers compare)."""
    return int.from_bytes(block_hash[:8], "little", signed=True)


def prompt_prefix(token_ids: Sequence[int], block_size: int, key: bytes) -> list[int]:
    """The ``short`` hashes of the leading full blocks of ``token_ids`` (at most
    ``MAX_BLOCKS``), chained as the engine's prefix cache chains them."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids[: MAX_BLOCKS * block_size], block_size, key)
    return [short(h) for h in hashes]


def leading_hits(prefix: Sequence[int], held: frozenset[int] | set[int]) -> int:
    """How many leading blocks of ``prefix`` are in ``held`` (a chained hash is only a
    hit if every block before it is)."""
    n = 0
    for h in prefix:
        if h not in held:
            break
        n += 1
    return n


def rank(candidates: Sequence[T], load: Callable[[T], float], hits: Callable[[T], int],
         slack: float = SLACK) -> list[T]:  # fmt: skip
    """``candidates`` in the order to try them (see the module docstring): least loaded
    first (ties at random), except that the one with the most prefix hits goes first
    while its load is at most the least load plus ``slack``."""
    by_load = sorted(candidates, key=lambda r: (load(r), random.random()))
    if not by_load:
        return []
    least = load(by_load[0])
    near = [r for r in by_load if load(r) <= least + slack and hits(r) > 0]
    if not near:
        return by_load
    best = max(near, key=lambda r: (hits(r), -load(r)))  # by_load order breaks ties
    return [best, *(r for r in by_load if r is not best)]


class PromptHasher:
    """Tokenizes a request's prompt as the engine does and hashes its leading blocks,
    without torch (``engine.tokenizer``: an API process imports none).

    ``info``: a core's ``info`` (``model_dir``, ``block_size``, ``prefix_key``,
    ``max_model_len``).
    Raises ``OSError`` when the model directory is not on this node (then the API
    process goes without affinity)."""

    def __init__(self, info: dict[str, Any]) -> None:
        from engine.tokenizer import Tokenizer

        self.block_size = int(info["block_size"])
        self.max_model_len = int(info.get("max_model_len", 1 << 30))
        self.key = bytes.fromhex(str(info["prefix_key"]))
        self.tokenizer = Tokenizer(str(info["model_dir"]))

    def token_ids(self, req: Mapping[str, Any]) -> list[int]:
        """The prompt's token ids (``prompt``: text or ids; or chat ``messages``)."""
        if req.get("messages") is not None:
            return self.tokenizer.encode(self.tokenizer.render_chat(req["messages"]))
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt or ()]

    def prefix(self, token_ids: list[int]) -> list[int]:
        return prompt_prefix(token_ids, self.block_size, self.key)
