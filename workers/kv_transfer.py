"""Moving a request's KV blocks from one rank to another (prefill → decode).

``pack_blocks`` gathers the blocks of every layer into one contiguous tensor
``[layers, 2, n, block_size, kv_heads, head_dim]``; ``unpack_blocks`` scatters such a
tensor into other block ids of another cache of the same shape. ``KVChannel`` is one
direction between two ranks: a 2-rank process group made on demand (gloo on CPU,
NCCL on GPU), so pools pair up without a fixed world. A transfer is two messages, a
header (block count, payload elements) then the payload, so a mismatch fails loudly
instead of corrupting a cache. A transfer may carry a part of the KV heads (``heads``):
groups of different tensor-parallel sizes re-slice them route by route
(``workers.kv_routes``). Transfers on a channel happen in call order on both
sides; with one channel per (sender, receiver) pair and both sides calling in the
same order (the ledger's), concurrent transfers cannot deadlock.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from workers.comm import new_group, retire_group

SENDER, RECEIVER = 0, 1


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


def layer_stack(kv_caches: list[torch.Tensor]) -> torch.Tensor | None:
    """The layers' caches as one ``[layers, *cache.shape]`` view, when they are equally
    spaced, non-overlapping, contiguous views of one storage (as ``engine.kv_cache``
    allocates them); ``None`` otherwise (then the per-layer path is used)."""
    first = kv_caches[0]
    size = first.element_size()
    step = (kv_caches[1].data_ptr() - first.data_ptr()) // size if len(kv_caches) > 1 else 0
    if len(kv_caches) > 1 and step < first.numel():
        return None
    base = first.untyped_storage().data_ptr()
    for i, cache in enumerate(kv_caches):
        if (cache.shape != first.shape or cache.dtype != first.dtype or not cache.is_contiguous()
                or cache.untyped_storage().data_ptr() != base
                or cache.data_ptr() != first.data_ptr() + i * step * size):  # fmt: skip
            return None
    return first.as_strided((len(kv_caches), *first.shape), (step, *first.stride()))


def gather_blocks(kv_caches: list[torch.Tensor], stack: torch.Tensor | None, idx: torch.Tensor,
                  lo: int, hi: int, out: torch.Tensor) -> None:  # fmt: skip
    """Copies blocks ``idx`` (a device tensor of block ids) of layers ``lo:hi`` into
    ``out`` (``[hi - lo, 2, len(idx), block_size, kv_heads, head_dim]``): one index
    kernel over ``stack`` (``layer_stack(kv_caches)``, computed once per transfer by
    the caller), or one kernel per layer when it is ``None``."""
    if stack is None:
        for j, layer in enumerate(range(lo, hi)):
            torch.index_select(kv_caches[layer], 1, idx, out=out[j])
        return
    torch.index_select(_rows(stack[lo:hi]), 2, idx, out=_rows(out))


def scatter_blocks(kv_caches: list[torch.Tensor], stack: torch.Tensor | None, idx: torch.Tensor,
                   lo: int, hi: int, src: torch.Tensor) -> None:  # fmt: skip
    """Writes ``src`` (as ``gather_blocks`` fills it) into blocks ``idx`` of layers
    ``lo:hi``, by the same paths as ``gather_blocks``."""
    if stack is None:
        for j, layer in enumerate(range(lo, hi)):
            kv_caches[layer].index_copy_(1, idx, src[j])
        return
    _rows(stack[lo:hi]).index_copy_(2, idx, _rows(src))


def head_slice(kv_caches: list[torch.Tensor], heads: tuple[int, int] | None) -> list[torch.Tensor]:
    """The caches' views of KV heads ``heads`` = (first, count) (all: ``None``). A part
    of the heads is not contiguous, so gathers and scatters take the per-layer path."""
    if heads is None or heads == (0, kv_caches[0].shape[-2]):
        return kv_caches
    return [cache.narrow(-2, heads[0], heads[1]) for cache in kv_caches]


def _index(block_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[layers, 2, blocks, *block]`` viewed as ``[layers, 2, blocks, block words]``
    (a view, never a copy: writes through it land in ``t``). A block's bytes are seen
    as 8-byte words where they divide evenly: the copy kernels move one element per
    thread step, and 2-byte elements left them at a third of the copy bandwidth."""
    rows = t.view(*t.shape[:3], -1)
    if (rows.shape[-1] * rows.element_size()) % 8 == 0 and rows.element_size() < 8:
        return rows.view(torch.int64)
    return rows


def _packed(kv_caches: list[torch.Tensor], num_blocks: int) -> torch.Tensor:
    """An empty tensor in ``pack_blocks``' layout for ``num_blocks`` blocks."""
    first = kv_caches[0]
    shape = (len(kv_caches), first.shape[0], num_blocks, *first.shape[2:])
    return torch.empty(shape, dtype=first.dtype, device=first.device)


def pack_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """One contiguous copy of ``block_ids`` of every layer (layer-major):
    ``[layers, 2, len(block_ids), block_size, kv_heads, head_dim]``."""
    out = _packed(kv_caches, len(block_ids))
    idx = _index(block_ids, out.device)
    gather_blocks(kv_caches, layer_stack(kv_caches), idx, 0, len(kv_caches), out)
    return out


def unpack_blocks(
    kv_caches: list[torch.Tensor], block_ids: list[int], packed: torch.Tensor
) -> None:
    """Writes ``packed`` (from ``pack_blocks``) into ``block_ids`` of every layer."""
    if packed.shape[0] != len(kv_caches) or packed.shape[2] != len(block_ids):
        raise ValueError(f"packed KV {tuple(packed.shape)} does not fit {len(kv_caches)} layers "
                         f"x {len(block_ids)} blocks")  # fmt: skip
    idx = _index(block_ids, packed.device)
    scatter_blocks(kv_caches, layer_stack(kv_caches), idx, 0, len(kv_caches), packed)


CHUNK_BYTES = int(os.environ.get("KVSERVE_KV_CHUNK_MIB", "64")) << 20
"""Bytes per message of a transfer (whole layers, at least one layer a message; 0: the
whole transfer in one message). Each message costs the CPU one gather launch and one
NCCL call, so messages must be large enough for the link, not the CPU, to set the
pace; several of them let the gather of one overlap the send of the previous."""


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
        self.header_wait_s = 0.0  # the last receive's wait for its header

    def send(self, kv_caches: list[torch.Tensor], block_ids: list[int],
             chunk_bytes: int | None = None, heads: tuple[int, int] | None = None) -> int:  # fmt: skip
        """Sends the blocks (of KV heads ``heads`` = (first, count) only, when given);
        returns the bytes of the payload.

        A header (block count, elements) goes first. The payload, in ``pack_blocks``'
        layout, goes as messages of whole layers (``chunk_bytes``, default
        ``CHUNK_BYTES``; both ends must use the same): each message's layers are
        gathered by one kernel and its send is issued at once, so the gather of message
        i+1 overlaps the send of message i (NCCL's stream waits for the gather it
        depends on). Returns once the sends are issued and the current stream waits
        for them."""
        kv_caches = head_slice(kv_caches, heads)
        first = kv_caches[0]
        header = torch.tensor([len(block_ids), _payload_elems(kv_caches, len(block_ids))],
                              dtype=torch.long, device=first.device)  # fmt: skip
        self.group.send([header], RECEIVER, 0).wait()
        buf, stack = _packed(kv_caches, len(block_ids)), layer_stack(kv_caches)
        idx, works = _index(block_ids, first.device), []
        for lo, hi in _chunks(kv_caches, len(block_ids), chunk_bytes):
            gather_blocks(kv_caches, stack, idx, lo, hi, buf[lo:hi])
            works.append(self.group.send([buf[lo:hi]], RECEIVER, 1))
        for work in works:
            work.wait()
        return self._count(buf.numel() * buf.element_size())

    def recv(self, kv_caches: list[torch.Tensor], block_ids: list[int],
             chunk_bytes: int | None = None, heads: tuple[int, int] | None = None) -> int:  # fmt: skip
        """Receives a transfer into ``block_ids`` (into KV heads ``heads`` only, when
        given); returns the payload's bytes. Every message's receive is posted at once;
        each is scattered into the cache (one kernel) as it lands."""
        kv_caches = head_slice(kv_caches, heads)
        first = kv_caches[0]
        t0 = time.perf_counter()
        header = torch.zeros(2, dtype=torch.long, device=first.device)
        self.group.recv([header], SENDER, 0).wait()
        n, elems = (int(x) for x in header.tolist())
        self.header_wait_s = time.perf_counter() - t0
        if n != len(block_ids) or elems != _payload_elems(kv_caches, len(block_ids)):
            shape = (len(kv_caches), first.shape[0], len(block_ids), *first.shape[2:])
            raise ValueError(f"sender sent {n} blocks ({elems} elements); this side expects "
                             f"{len(block_ids)} blocks of shape {shape}")  # fmt: skip
        buf, stack = _packed(kv_caches, n), layer_stack(kv_caches)
        idx, chunks = _index(block_ids, first.device), _chunks(kv_caches, n, chunk_bytes)
        posted = [self.group.recv([buf[lo:hi]], SENDER, 1) for lo, hi in chunks]
        for work, (lo, hi) in zip(posted, chunks, strict=True):
            work.wait()  # this message only: its scatter waits for it, later ones go on
            scatter_blocks(kv_caches, stack, idx, lo, hi, buf[lo:hi])
        return self._count(buf.numel() * buf.element_size())

    def close(self) -> None:
        """The channel is done: gloo's pending sends/receives break (sockets close); an
        NCCL group is only retired (see ``workers.comm.retire_group``)."""
        retire_group(self.group, abort=self.backend == "gloo")

    def _count(self, nbytes: int) -> int:
        self.bytes_moved += nbytes
        self.transfers += 1
        return nbytes


def _chunks(kv_caches: list[torch.Tensor], num_blocks: int, chunk_bytes: int | None
            ) -> list[tuple[int, int]]:  # fmt: skip
    """The layer ranges of a transfer's messages: about ``chunk_bytes`` each (whole
    layers, at least one); 0 means one message."""
    layers = len(kv_caches)
    limit = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_layer = _payload_elems(kv_caches, num_blocks) // layers * kv_caches[0].element_size()
    step = layers if limit <= 0 else max(1, min(layers, limit // max(1, per_layer)))
    return [(lo, min(layers, lo + step)) for lo in range(0, layers, step)]


def _payload_elems(kv_caches: list[torch.Tensor], num_blocks: int) -> int:
    first = kv_caches[0]
    return len(kv_caches) * first.shape[0] * num_blocks * int(torch.Size(first.shape[2:]).numel())
