"""Triton kernels for attention over the paged KV cache (GPU path).

Cache of one layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``. Every kernel
reads K/V through the block table, ``BLOCK_N`` positions at a time (several pages per
iteration, gathered row by row), so tiles stay large whatever the block size.

* ``store_kv``: new K/V rows into their slots (slot < 0: padding, skipped).
* ``paged_decode``: one query token per sequence. A program serves all query heads of
  one KV head (GQA-aware: the group is the tile's M dimension) over one split of the
  context (split-K); ``paged_decode_reduce`` merges the splits' partial softmaxes.
* ``paged_prefill``: any number of new tokens per sequence (prefill, chunked prefill,
  prefix-cache hits), variable lengths in one launch; new tokens attend to the cached
  prefix and causally to each other.

An FP8 (e4m3) cache holds ``x / scale`` per layer; kernels convert on load and fold the
scales into the softmax scale (K) and the output (V).

Sliding windows: a query at position p sees keys at positions k with p - k < window
(``WINDOW = 0`` means full attention). ``PRECISION`` is "ieee" for float32 inputs (exact
comparisons with the reference; Triton would otherwise use TF32) and "tf32" otherwise. The torch reference in ``torch_ref.py`` is the
oracle for all of them (``tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_vt, stride_c_kv, k_scale, v_scale,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:  # FP8 cache: store x / scale, saturated
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    dst = cache_ptr + slot.to(tl.int64) * ROW + offs
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_splits", "split_len"])
def _paged_decode_kernel(
    q_ptr, rows_ptr, cache_ptr, block_table_ptr, seq_lens_ptr,
    part_acc_ptr, part_ml_ptr,
    stride_qt, stride_qh,
    stride_c_kv, stride_c_blk, stride_c_slot, stride_c_head,
    stride_bt,
    scale, k_scale, v_scale, num_splits, split_len,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    q_row = tl.load(rows_ptr + b).to(tl.int64)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if WINDOW > 0:
        start = tl.maximum(start, seq_len - WINDOW)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + q_row * stride_qt + (kvh * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None], other=0.0,
    )  # fmt: skip
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    base = cache_ptr + kvh * stride_c_head
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        blk = tl.load(block_table_ptr + b * stride_bt + pos // PAGE, mask=n_mask, other=0).to(
            tl.int64
        )
        row = base + blk * stride_c_blk + (pos % PAGE) * stride_c_slot
        k = tl.load(row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (
            scale * k_scale
        )  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            row[:, None] + stride_c_kv + offs_d[None, :], mask=n_mask[:, None], other=0.0
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc * v_scale  # FP8 values were stored as v / v_scale (1.0 otherwise)
    # Partials: acc [B, Hq, S, D] and (m, l) [B, Hq, S, 2], unnormalised.
    h = kvh * GROUP + offs_g
    num_heads = tl.num_programs(1) * GROUP
    part = (b * num_heads + h) * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=g_mask)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, rows_ptr, out_ptr,
    stride_ot, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    part = (b * num_heads + h) * num_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_mask & (m > float("-inf")), tl.exp(m - m_safe), 0.0)
    denom = tl.sum(w * l_part, 0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    q_row = tl.load(rows_ptr + b).to(tl.int64)
    tl.store(out_ptr + q_row * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _paged_prefill_kernel(
    q_ptr, out_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr, q_len_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_slot, stride_c_head,
    stride_bt, scale, k_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(q_start_ptr + b).to(tl.int64)
    q_len = tl.load(q_len_ptr + b)
    if mt * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # cached positions before the new tokens
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    qpos = ctx + offs_m
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None], other=0.0,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    base = cache_ptr + (h // GROUP) * stride_c_head
    hi = tl.minimum(seq_len, ctx + (mt + 1) * BLOCK_M)  # causal: nothing past the tile's last query
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, ctx + mt * BLOCK_M - WINDOW + 1) // BLOCK_N * BLOCK_N
        diag = lo  # a window can cut into any tile: every tile is masked
    else:
        # Tiles wholly at or before the tile's first query position are visible to every
        # query: no mask, no bounds (they lie before seq_len). The same sums as the
        # masked loop (a mask of all True changes nothing), with less work per tile.
        diag = (ctx + mt * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, diag, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            blk = tl.load(block_table_ptr + b * stride_bt + pos // PAGE).to(tl.int64)
            row = base + blk * stride_c_blk + (pos % PAGE) * stride_c_slot
            k = tl.load(row[:, None] + offs_d[None, :]).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * k_scale)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(row[:, None] + stride_c_kv + offs_d[None, :]).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    for n0 in range(diag, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < hi
        blk = tl.load(block_table_ptr + b * stride_bt + pos // PAGE, mask=n_mask, other=0).to(
            tl.int64
        )
        row = base + blk * stride_c_blk + (pos % PAGE) * stride_c_slot
        k = tl.load(row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (
            scale * k_scale
        )  # [BLOCK_M, BLOCK_N]
        visible = n_mask[None, :] & (pos[None, :] <= qpos[:, None])
        if WINDOW > 0:
            visible = visible & (qpos[:, None] - pos[None, :] < WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            row[:, None] + stride_c_kv + offs_d[None, :], mask=n_mask[:, None], other=0.0
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None],
    )  # fmt: skip
