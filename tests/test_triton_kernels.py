"""Triton attention kernels against the torch reference on fresh random inputs:
odd lengths, block boundaries, GQA ratios 1/4/8, sliding windows, cached prefixes.
On CUDA they run for real; without it, in Triton's interpreter."""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from engine.attention.metadata import AttentionMetadata  # noqa: E402
from engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import (  # noqa: E402
    DecodeBatch,
    PrefillBatch,
    decode_splits,
    paged_decode,
    paged_prefill,
    store_kv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = {"atol": 2e-2, "rtol": 2e-2} if torch.bfloat16 == DTYPE else {"atol": 1e-4, "rtol": 1e-4}


def make_case(
    seq_lens: list[int], q_lens: list[int], hq: int, hk: int, d: int, page: int, seed: int
):
    """Random paged cache + new tokens; returns tensors and the reference metadata."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    need = [-(-n // page) for n in seq_lens]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    rnd.shuffle(ids)  # block tables are not contiguous
    tables, at = [], 0
    for n in need:
        tables.append(ids[at : at + n])
        at += n
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(t, hk, d, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(t, hk, d, generator=g).to(DEVICE, DTYPE)
    cache = torch.randn(2, num_blocks, page, hk, d, generator=g).to(DEVICE, DTYPE)
    starts, slots = [0], []
    for n, ql, table in zip(seq_lens, q_lens, tables, strict=True):
        starts.append(starts[-1] + ql)
        slots += [table[p // page] * page + p % page for p in range(n - ql, n)]
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=seq_lens,
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=tables,
        block_size=page,
    )
    return q, k, v, cache, meta


def padded_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor(
        [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
    )


def i32(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


def test_store_kv_writes_each_row_into_its_slot() -> None:
    _, k, v, cache, meta = make_case([5, 20], [5, 3], 4, 2, 16, 4, seed=0)
    ref = cache.clone()
    ref[0].view(-1, 2, 16).index_copy_(0, meta.slot_mapping, k)
    ref[1].view(-1, 2, 16).index_copy_(0, meta.slot_mapping, v)
    slots = meta.slot_mapping.clone()
    store_kv(k, v, cache, slots)
    torch.testing.assert_close(cache, ref, atol=0, rtol=0)
    # A negative slot (padding row) writes nothing.
    before = cache.clone()
    store_kv(k[:1] + 1, v[:1] + 1, cache, torch.tensor([-1], device=DEVICE))
    assert torch.equal(cache, before)


@pytest.mark.parametrize(
    ("seq_lens", "q_lens", "hq", "hk", "d", "page", "window"),
    [
        ([1, 17, 64, 100], [1, 17, 30, 7], 8, 8, 32, 16, None),  # GQA 1, prefix hits, odd lengths
        ([33, 16, 48], [33, 16, 16], 8, 2, 64, 16, None),  # GQA 4, block boundaries
        ([70, 9], [40, 9], 8, 1, 32, 8, None),  # GQA 8 (MQA)
        ([300, 130], [200, 130], 8, 2, 32, 16, None),  # several unmasked tiles before the diagonal
        ([90, 40], [90, 20], 4, 2, 32, 16, 24),  # sliding window shorter than the prompt
        ([130], [65], 4, 4, 16, 32, 100),
    ],
)
def test_prefill_matches_reference(seq_lens, q_lens, hq, hk, d, page, window) -> None:
    q, k, v, cache, meta = make_case(seq_lens, q_lens, hq, hk, d, page, seed=sum(seq_lens))
    scale = d**-0.5
    ref_cache = cache.clone()
    expected = TorchAttentionBackend(hq, hk, d, scale).forward(q, k, v, ref_cache, meta, window)
    store_kv(k, v, cache, meta.slot_mapping)
    out = torch.zeros_like(q)
    batch = PrefillBatch(
        q_start=i32(meta.query_start_loc[:-1]),
        q_len=i32(q_lens),
        block_tables=padded_tables(meta.block_tables),
        seq_lens=i32(seq_lens),
        max_q_len=max(q_lens),
    )
    paged_prefill(q, cache, batch, scale, window, out)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize(
    ("seq_lens", "hq", "hk", "d", "page", "window", "sms"),
    [
        ([1, 15, 16, 17, 200], 8, 8, 32, 16, None, 4),  # GQA 1, boundaries, split-K
        ([300, 64], 8, 2, 64, 16, None, 8),  # GQA 4, several splits
        ([129, 5], 8, 1, 32, 8, None, 2),  # GQA 8
        ([150, 20], 4, 2, 32, 16, 33, 4),  # sliding window
    ],
)
def test_decode_matches_reference(seq_lens, hq, hk, d, page, window, sms) -> None:
    q, k, v, cache, meta = make_case(
        seq_lens, [1] * len(seq_lens), hq, hk, d, page, seed=len(seq_lens)
    )
    scale = d**-0.5
    ref_cache = cache.clone()
    expected = TorchAttentionBackend(hq, hk, d, scale).forward(q, k, v, ref_cache, meta, window)
    store_kv(k, v, cache, meta.slot_mapping)
    out = torch.zeros_like(q)
    splits, split_len = decode_splits(max(seq_lens), len(seq_lens), hk, num_sms=sms)
    batch = DecodeBatch(
        rows=i32(list(range(len(seq_lens)))),
        block_tables=padded_tables(meta.block_tables),
        seq_lens=i32(seq_lens),
        num_splits=splits,
        split_len=split_len,
    )
    paged_decode(q, cache, batch, scale, window, out)
    torch.testing.assert_close(out, expected, **TOL)


def test_decode_splits_cover_the_context() -> None:
    for max_len in (1, 63, 64, 65, 1000, 8192):
        for batch in (1, 8, 64):
            s, n = decode_splits(max_len, batch, 8, num_sms=132)
            assert s * n >= max_len > (s - 1) * n and n % 64 == 0


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fp8_cache_matches_reference(kind: str) -> None:
    seq_lens, q_lens = ([40, 17], [25, 17]) if kind == "prefill" else ([40, 17], [1, 1])
    q, k, v, cache, meta = make_case(seq_lens, q_lens, 8, 2, 32, 16, seed=3)
    cache = cache.to(torch.float8_e4m3fn)
    scale, scales = 32**-0.5, (0.5, 2.0)
    ref_backend = TorchAttentionBackend(8, 2, 32, scale)
    ref_backend.k_scale, ref_backend.v_scale = scales
    ref_cache = cache.clone()
    expected = ref_backend.forward(q, k, v, ref_cache, meta, None)
    store_kv(k, v, cache, meta.slot_mapping, scales)
    if DEVICE == "cuda":
        # The store agrees with torch's e4m3 rounding. (Triton 3.9's interpreter rounds
        # wrongly when the mantissa carries into the exponent, 7.97 -> 4.0, so this part
        # is checked on the GPU only.)
        torch.testing.assert_close(cache.float(), ref_cache.float(), atol=2**-9, rtol=0.125)
    # Attention: both read the same quantized cache.
    cache = ref_cache
    out = torch.zeros_like(q)
    tables, lens = padded_tables(meta.block_tables), i32(seq_lens)
    if kind == "prefill":
        batch = PrefillBatch(i32(meta.query_start_loc[:-1]), i32(q_lens), tables, lens, max(q_lens))
        paged_prefill(q, cache, batch, scale, None, out, scales)
    else:
        splits, split_len = decode_splits(max(seq_lens), 2, 2, num_sms=4)
        batch_d = DecodeBatch(i32([0, 1]), tables, lens, splits, split_len)
        paged_decode(q, cache, batch_d, scale, None, out, scales)
    torch.testing.assert_close(out, expected, **TOL)
