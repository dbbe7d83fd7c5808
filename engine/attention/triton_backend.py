"""Attention through the Triton kernels (CUDA; the Triton interpreter on CPU in tests).

Per step the runner provides ``TritonMetadata`` (device tensors); decode rows go
through the split-K decode kernel, sequences with several new tokens through the
varlen prefill kernel, in the same layer call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from engine.attention.metadata import AttentionMetadata, padded_tables
from engine.attention.torch_ref import TorchAttentionBackend
from engine.attention.triton_kernels import (
    _paged_decode_kernel,
    _paged_decode_reduce_kernel,
    _paged_prefill_kernel,
    _store_kv_kernel,
)


@dataclass(slots=True)
class DecodeBatch:
    """Sequences adding one token: their token rows, block tables, lengths (int32)."""

    rows: torch.Tensor  # [Bd]
    block_tables: torch.Tensor  # [Bd, M]
    seq_lens: torch.Tensor  # [Bd]
    num_splits: int
    split_len: int  # positions per split, a multiple of BLOCK_N


@dataclass(slots=True)
class PrefillBatch:
    """Sequences adding several tokens: rows [q_start, q_start + q_len) of the batch."""

    q_start: torch.Tensor  # [Bp]
    q_len: torch.Tensor  # [Bp]
    block_tables: torch.Tensor  # [Bp, M]
    seq_lens: torch.Tensor  # [Bp]
    max_q_len: int


@dataclass(slots=True)
class TritonStepData:
    decode: DecodeBatch | None
    prefill: PrefillBatch | None


DECODE_BLOCK_N = 64


def build_step_data(
    query_start_loc: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    kv_heads: int,
    num_sms: int,
    device: torch.device,
) -> TritonStepData:
    """Splits a step's sequences into decode rows and prefill sequences (host lists in,
    int32 device tensors out)."""
    dec: list[int] = []
    pre: list[int] = []
    for i in range(len(seq_lens)):
        (dec if query_start_loc[i + 1] - query_start_loc[i] == 1 else pre).append(i)

    def tables(idx: list[int]) -> torch.Tensor:
        rows = padded_tables([block_tables[i] for i in idx])
        return torch.from_numpy(rows).to(device, non_blocking=True)

    def i32(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.int32).to(device, non_blocking=True)

    decode = prefill = None
    if dec:
        splits, split_len = decode_splits(
            max(seq_lens[i] for i in dec), len(dec), kv_heads, num_sms
        )
        decode = DecodeBatch(
            i32([query_start_loc[i] for i in dec]),
            tables(dec),
            i32([seq_lens[i] for i in dec]),
            splits,
            split_len,
        )
    if pre:
        q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in pre]
        prefill = PrefillBatch(
            i32([query_start_loc[i] for i in pre]),
            i32(q_lens),
            tables(pre),
            i32([seq_lens[i] for i in pre]),
            max(q_lens),
        )
    return TritonStepData(decode, prefill)


def decode_splits(max_seq_len: int, batch: int, kv_heads: int, num_sms: int) -> tuple[int, int]:
    """(num_splits, split_len): enough programs to fill the GPU about twice, each split
    a whole number of ``DECODE_BLOCK_N`` tiles."""
    tiles = triton.cdiv(max(max_seq_len, 1), DECODE_BLOCK_N)
    want = max(1, triton.cdiv(2 * num_sms, batch * kv_heads))
    splits = max(1, min(want, tiles, 64))
    split_len = triton.cdiv(tiles, splits) * DECODE_BLOCK_N
    return triton.cdiv(max(max_seq_len, 1), split_len), split_len


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """k, v: [T, Hk, D] (rows contiguous); slot_mapping [T] (negative = skip); an FP8
    cache stores ``x / scale`` (``scales`` = K's and V's of this layer)."""
    t, hk, d = k.shape
    assert k.stride(1) == d and k.stride(2) == 1 and v.stride(1) == d and v.stride(2) == 1
    assert kv_cache.is_contiguous()
    row = hk * d
    _store_kv_kernel[(t,)](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache.stride(0), *scales,
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )  # fmt: skip


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
    window: int | None,
    out: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Writes attention of rows ``batch.rows`` of q ([T, Hq, D]) into the same rows of out."""
    _, hq, d = q.shape
    hk, page = kv_cache.shape[3], kv_cache.shape[2]
    group = hq // hk
    b = batch.rows.shape[0]
    s = batch.num_splits
    part_acc = torch.empty(b, hq, s, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b, hq, s, 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(b, hk, s)](
        q, batch.rows, kv_cache, batch.block_tables, batch.seq_lens, part_acc, part_ml,
        q.stride(0), q.stride(1), *_cache_strides(kv_cache), batch.block_tables.stride(0),
        scale, *scales, s, batch.split_len,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        PAGE=page, BLOCK_N=DECODE_BLOCK_N, WINDOW=window or 0, PRECISION=_precision(q),
    )  # fmt: skip
    _paged_decode_reduce_kernel[(b, hq)](
        part_acc, part_ml, batch.rows, out, out.stride(0), out.stride(1), s,
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(s)),
    )  # fmt: skip


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
    window: int | None,
    out: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    _, hq, d = q.shape
    hk, page = kv_cache.shape[3], kv_cache.shape[2]
    block_m = 64 if batch.max_q_len > 32 else 16
    grid = (batch.q_len.shape[0], hq, triton.cdiv(batch.max_q_len, block_m))
    _paged_prefill_kernel[grid](
        q, out, kv_cache, batch.block_tables, batch.seq_lens, batch.q_start, batch.q_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(kv_cache), batch.block_tables.stride(0), scale, *scales,
        GROUP=hq // hk, HEAD_DIM=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=64, WINDOW=window or 0,
        PRECISION=_precision(q),
    )  # fmt: skip


class TritonAttentionBackend:
    """The GPU backend: same contract as ``TorchAttentionBackend``; the recompute mode
    (no cache) falls back to the torch reference."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.scale = scale
        self.k_scale = 1.0  # per-layer FP8 scales, as in the torch reference
        self.v_scale = 1.0
        self._fallback = TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        window: int | None,
    ) -> torch.Tensor:
        if not meta.use_cache or kv_cache is None:
            return self._fallback.forward(q, k, v, kv_cache, meta, window)
        data: TritonStepData = meta.triton
        assert meta.slot_mapping is not None and data is not None
        scales = (self.k_scale, self.v_scale)
        store_kv(k, v, kv_cache, meta.slot_mapping, scales)
        out = torch.empty_like(q)
        if data.decode is not None:
            paged_decode(q, kv_cache, data.decode, self.scale, window, out, scales)
        if data.prefill is not None:
            paged_prefill(q, kv_cache, data.prefill, self.scale, window, out, scales)
        return out


def triton_supported(head_dim: int) -> bool:
    """The kernels need a power-of-two head_dim of at least 16 (tl.dot tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
