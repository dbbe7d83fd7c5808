"""Reference attention over the paged cache, in plain torch (CPU and CUDA).

KV cache of one layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``
(K at index 0, V at 1). A step first writes every new token's K/V into its slot,
then each sequence attends to its cached positions, so a sequence may read blocks
that another sequence of the same step has just written (shared prefixes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata

FP8 = torch.float8_e4m3fn


def write_kv(
    kv_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Stores k, v ([T, Hk, D]) at ``slot_mapping`` ([T]) of the layer's cache; an FP8
    cache stores ``x / scale`` rounded to e4m3 (written through a byte view)."""
    _, _, _, hk, d = kv_cache.shape
    for i, (x, scale) in enumerate(((k, scales[0]), (v, scales[1]))):
        dst = kv_cache[i].view(-1, hk, d)
        if kv_cache.dtype == FP8:
            x = (x.float() / scale).clamp(-448.0, 448.0).to(FP8).view(torch.uint8)
            dst = dst.view(torch.uint8)
        dst.index_copy_(0, slot_mapping, x)


def take_blocks(kv_cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``kv_cache[:, ids]`` (FP8 caches are indexed through a byte view), by
    ``index_select``: one copy per block, where advanced indexing costs 20x more
    inside a CPU step."""
    cache = kv_cache.view(torch.uint8) if kv_cache.dtype == FP8 else kv_cache
    out = cache.index_select(1, ids.reshape(-1)).view(
        *cache.shape[:1], *ids.shape, *cache.shape[2:]
    )
    return out.view(FP8) if kv_cache.dtype == FP8 else out


def dequantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache values in the compute dtype (FP8: times the layer's scale)."""
    return x.to(dtype) * scale if x.dtype == FP8 else x


def gather_kv(
    kv_cache: torch.Tensor, block_ids: list[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ``length`` positions: [length, Hk, D] each."""
    _, _, bs, hk, d = kv_cache.shape
    n = -(-length // bs)
    ids = torch.tensor(block_ids[:n], dtype=torch.long, device=kv_cache.device)
    kv = take_blocks(kv_cache, ids).reshape(2, n * bs, hk, d)[:, :length]
    return kv[0], kv[1]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[S, H, D] -> [1, H, S, D]. NOTE: SDPA wants 4-D input: on CPU a 3-D call falls
    back to the unfused math kernel (5x slower at 1k tokens)."""
    return x.transpose(0, 1)[None]


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool; query i sits at position kv_len - q_len + i."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= qpos - kpos < window
    return mask


class TorchAttentionBackend:
    """Paged attention in torch: decode rows batched, prefill rows per sequence."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Per-layer FP8 scales (stored value = x / scale); 1.0 unless calibrated.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hk, D]
        v: torch.Tensor,  # [T, Hk, D]
        kv_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        window: int | None,
    ) -> torch.Tensor:  # [T, Hq, D]
        if not meta.use_cache or kv_cache is None:
            return self._uncached(q, k, v, meta, window)
        assert meta.slot_mapping is not None
        write_kv(kv_cache, k, v, meta.slot_mapping, (self.k_scale, self.v_scale))
        fp8 = kv_cache.dtype == FP8
        out = torch.empty_like(q)
        any_decode = False
        for i in range(meta.num_seqs):
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if e - s == 1:
                any_decode = True
                continue
            n = meta.seq_lens[i]
            if n == e - s and not fp8:  # no cached prefix: the fresh K/V are the whole context
                out[s:e] = self._attend_causal(q[s:e], k[s:e], v[s:e], window)
                continue
            ks, vs = gather_kv(kv_cache, meta.block_tables[i], n)
            ks, vs = dequantize(ks, q.dtype, self.k_scale), dequantize(vs, q.dtype, self.v_scale)
            out[s:e] = self._attend(q[s:e], ks, vs, causal_mask(e - s, n, window, q.device))
        if any_decode:
            self._decode(q, kv_cache, meta, window, out)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        window: int | None,
        out: torch.Tensor,
    ) -> None:
        _, rows, tables, _ = meta.decode_batch(q.device)
        _, _, bs, hk, d = kv_cache.shape
        b, m = tables.shape
        kv = (
            take_blocks(kv_cache, tables).view(2, b, m * bs, hk, d).transpose(2, 3)
        )  # [2, B, Hk, L, D]
        k_all = dequantize(kv[0], q.dtype, self.k_scale)
        v_all = dequantize(kv[1], q.dtype, self.v_scale)
        mask = meta.decode_mask(window, m * bs, q.device)  # [B, 1, 1, L]
        qd = q[rows].unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            qd, k_all, v_all, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        out[rows] = o.squeeze(2)

    def _uncached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        window: int | None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[s:e] = self._attend_causal(q[s:e], k[s:e], v[s:e], window)
        return out

    def _attend_causal(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Causal self-attention over one sequence's own tokens; SDPA's fused causal
        path when no window cuts in."""
        if window is not None and window < q.shape[0]:
            return self._attend(q, k, v, causal_mask(q.shape[0], q.shape[0], window, q.device))
        return self._attend(q, k, v, None)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [S, Hq, D], k/v: [L, Hk, D], mask: [S, L] (None: causal, S == L) -> [S, Hq, D]."""
        o = F.scaled_dot_product_attention(
            _heads_first(q),
            _heads_first(k),
            _heads_first(v),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1)
