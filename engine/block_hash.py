"""Chained hashes over full blocks of token ids, for automatic prefix caching.

A block's hash covers its parent's hash, its own tokens and an extra key (model,
adapter, cache salt), so equal hashes mean equal prefixes, not just equal blocks.
The hash is stable across processes (blake2b, not Python's salted ``hash``), which
lets instances report the prefixes they hold to a cluster-wide ledger.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"kvserve-root"


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: bytes = b"") -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    h.update(extra_key)
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, extra_key: bytes = b""
) -> None:
    """Appends to ``hashes`` the hashes of every full block of ``token_ids`` not yet hashed."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(
            hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_key)
        )
