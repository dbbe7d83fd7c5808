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
import torch.distributed as dist

from workers.comm import new_group, retire_group

SENDER, RECEIVER = 0, 1


def rank_store(store: Any, rank: int) -> Any:
    """The part of a link's rendezvous ``store`` for the channel of tensor-parallel rank
    ``rank`` (every rank pair of a link meets in one store, each under its own prefix)."""
    return dist.PrefixStore(f"rank{rank}", store)


def synced(op: Any, caches: list[torch.Tensor], block_ids: list[int]) -> int:
    """Runs a send/receive ``op(caches, block_ids)`` on its own CUDA stream (on GPU)
    and waits for it, so that the blocks are complete when the call returns; the
    engine's steps go on meanwhile. Returns what ``op`` returns (bytes)."""
    if not caches or not caches[0].is_cuda:
        return int(op(caches, block_ids))
    torch.cuda.set_device(caches[0].device)  # a transfer thread's own current device
    stream = torch.cuda.Stream(device=caches[0].device)
    stream.wait_stream(torch.cuda.current_stream(caches[0].device))
    with torch.cuda.stream(stream):
        n = int(op(caches, block_ids))
    stream.synchronize()
    return n


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
        """Sends the blocks; returns the bytes of the payload.

        Layers go in chunks: each chunk is gathered into its own staging buffer and its
        send is issued at once without waiting, so gathering chunk i+1 overlaps sending
        chunk i (NCCL runs sends on its own stream after the gather it depends on)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
        header = torch.tensor([len(block_ids), _payload_elems(kv_caches, len(block_ids))],
                              dtype=torch.long, device=kv_caches[0].device)  # fmt: skip
        self.group.send([header], RECEIVER, 0).wait()
        works, total = [], 0
        for lo, hi in _chunks(len(kv_caches)):
            part = torch.stack([kv_caches[i].index_select(1, idx) for i in range(lo, hi)])
            works.append((self.group.send([part], RECEIVER, 1), part))
            total += part.numel() * part.element_size()
        for work, _ in works:
            work.wait()
        return self._count(total)

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        """Receives a transfer into ``block_ids``; returns the payload's bytes. Every
        chunk's receive is posted first; each is scattered into the cache as it lands."""
        first = kv_caches[0]
        header = torch.zeros(2, dtype=torch.long, device=first.device)
        self.group.recv([header], SENDER, 0).wait()
        n, elems = (int(x) for x in header.tolist())
        if n != len(block_ids) or elems != _payload_elems(kv_caches, len(block_ids)):
            shape = (len(kv_caches), first.shape[0], len(block_ids), *first.shape[2:])
            raise ValueError(f"sender sent {n} blocks ({elems} elements); this side expects "
                             f"{len(block_ids)} blocks of shape {shape}")  # fmt: skip
        idx = torch.tensor(block_ids, dtype=torch.long, device=first.device)
        posted, total = [], 0
        for lo, hi in _chunks(len(kv_caches)):
            part = torch.empty((hi - lo, first.shape[0], n, *first.shape[2:]), dtype=first.dtype,
                               device=first.device)  # fmt: skip
            posted.append((self.group.recv([part], SENDER, 1), part, lo))
            total += part.numel() * part.element_size()
        for work, part, lo in posted:
            work.wait()  # this chunk only: the scatter waits for it, later chunks go on
            for j in range(part.shape[0]):
                kv_caches[lo + j].index_copy_(1, idx, part[j])
        return self._count(total)

    def close(self) -> None:
        """The channel is done: gloo's pending sends/receives break (sockets close); an
        NCCL group is only retired (see ``workers.comm.retire_group``)."""
        retire_group(self.group, abort=self.backend == "gloo")

    def _count(self, nbytes: int) -> int:
        self.bytes_moved += nbytes
        self.transfers += 1
        return nbytes


LAYERS_PER_CHUNK = 4


def _chunks(num_layers: int) -> list[tuple[int, int]]:
    return [(lo, min(num_layers, lo + LAYERS_PER_CHUNK))
            for lo in range(0, num_layers, LAYERS_PER_CHUNK)]  # fmt: skip


def _payload_elems(kv_caches: list[torch.Tensor], num_blocks: int) -> int:
    first = kv_caches[0]
    return len(kv_caches) * first.shape[0] * num_blocks * int(torch.Size(first.shape[2:]).numel())


class GroupChannel:
    """One link's channels on every rank of a tensor-parallel group: rank 0's (a
    ``KVChannel`` in this process) and ranks 1..N-1's, held by their ``RankWorker``
    actors under ``key``. Rank r sends its head group's blocks to rank r of the peer;
    block ids are the same on every rank. ``send``/``recv`` move every rank's share at
    once and return the bytes of all of them; a rank that fails, or does not finish
    within ``timeout_s``, fails the call. Built by ``join`` (blocks until every rank
    met its peer)."""

    def __init__(self, local: KVChannel, actors: list[Any], key: str, timeout_s: float) -> None:
        self.local, self.actors, self.key, self.timeout_s = local, actors, key, timeout_s

    @classmethod
    def join(cls, actors: list[Any], key: str, host: str, port: int, base_store: Any,
             role: int, backend: str, timeout_s: float) -> GroupChannel:  # fmt: skip
        """Ranks 1.. join through the store at ``host:port``; rank 0 through
        ``base_store`` (that store itself on the side that hosts it)."""
        import ray

        refs = [a.kv_join.remote(key, host, port, role, backend, timeout_s) for a in actors]
        try:
            local = KVChannel(rank_store(base_store, 0), role, backend, timeout_s)
            ray.get(refs, timeout=timeout_s)
        except BaseException:
            for a in actors:
                a.kv_close.remote(key)
            raise
        return cls(local, actors, key, timeout_s)

    def send(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return self._move(True, kv_caches, block_ids)

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        return self._move(False, kv_caches, block_ids)

    def _move(self, send: bool, kv_caches: list[torch.Tensor], block_ids: list[int]) -> int:
        import ray

        refs = [a.kv_move.remote(self.key, send, block_ids) for a in self.actors]
        try:
            n = (
                self.local.send(kv_caches, block_ids)
                if send
                else self.local.recv(kv_caches, block_ids)
            )
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=False)
            raise
        return n + sum(int(x) for x in ray.get(refs, timeout=self.timeout_s))

    def close(self) -> None:
        self.local.close()
        for a in self.actors:
            a.kv_close.remote(self.key)
