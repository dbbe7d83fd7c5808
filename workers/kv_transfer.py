"""Moving a request's KV blocks from one rank to another (prefill → decode).

``pack_blocks`` gathers the blocks of every layer into one contiguous tensor
``[layers, 2, n, block_size, kv_heads, head_dim]``; ``unpack_blocks`` scatters such a
tensor into other block ids of another cache of the same shape. ``KVChannel`` is one
direction between two ranks: a 2-rank process group made on demand (gloo on CPU,
NCCL on GPU), so pools pair up without a fixed world. A transfer is two messages, a
header (block count, payload elements) then the payload, so a mismatch fails loudly
instead of corrupting a cache. Transfers on a channel happen in call order on both
sides; with one channel per (sender, receiver) pair and both sides calling in the
same order (the ledger's), concurrent transfers cannot deadlock.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.comm import new_group, retire_group

SENDER, RECEIVER = 0, 1


def pack_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """One contiguous copy of ``block_ids`` of every layer (layer-major)."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    return torch.stack([cache.index_select(1, idx) for cache in kv_caches])


def unpack_blocks(
    kv_caches: list[torch.Tensor], block_ids: list[int], packed: torch.Tensor
) -> None:
    """Writes ``packed`` (from ``pack_blocks``) into ``block_ids`` of every layer."""
    if packed.shape[0] != len(kv_caches) or packed.shape[2] != len(block_ids):
        raise ValueError(f"packed KV {tuple(packed.shape)} does not fit {len(kv_caches)} layers "
                         f"x {len(block_ids)} blocks")  # fmt: skip
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, idx, packed[layer])


class KVChannel:
    """The sending or receiving end of one sender → receiver pair."""

    def __init__(self, store: str | Any, role: int, backend: str = "gloo",
                 timeout_s: float = 60.0) -> None:  # fmt: skip
        if role not in (SENDER, RECEIVER):
            raise ValueError("role must be SENDER (0) or RECEIVER (1)")
        self.role = role
        self.backend = backend
        self.group = new_group(store, role, 2, backend, timeout_s)
        self.bytes_moved = 0
        self.transfers = 0

    def send(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        """Sends the blocks; returns the bytes of the payload."""
        packed = pack_blocks(kv_caches, block_ids)
        header = torch.tensor([len(block_ids), packed.numel()], dtype=torch.long)
        if packed.is_cuda:
            header = header.to(packed.device)
        self.group.send([header], RECEIVER, 0).wait()
        self.group.send([packed], RECEIVER, 1).wait()
        return self._count(packed)

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        """Receives a transfer into ``block_ids``; returns the payload's bytes."""
        first = kv_caches[0]
        header = torch.zeros(2, dtype=torch.long, device=first.device)
        self.group.recv([header], SENDER, 0).wait()
        n, elems = (int(x) for x in header.tolist())
        shape = (len(kv_caches), first.shape[0], len(block_ids), *first.shape[2:])
        if n != len(block_ids) or elems != torch.Size(shape).numel():
            raise ValueError(f"sender sent {n} blocks ({elems} elements); this side expects "
                             f"{len(block_ids)} blocks of shape {shape}")  # fmt: skip
        packed = torch.empty(shape, dtype=first.dtype, device=first.device)
        self.group.recv([packed], SENDER, 1).wait()
        unpack_blocks(kv_caches, block_ids, packed)
        return self._count(packed)

    def close(self) -> None:
        """The channel is done: gloo's pending sends/receives break (sockets close); an
        NCCL group is only retired (see ``workers.comm.retire_group``)."""
        retire_group(self.group, abort=self.backend == "gloo")

    def _count(self, packed: torch.Tensor) -> int:
        nbytes = packed.numel() * packed.element_size()
        self.bytes_moved += nbytes
        self.transfers += 1
        return nbytes
