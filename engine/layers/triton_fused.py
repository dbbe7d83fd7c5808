"""Fused elementwise kernels for the GPU path (each replaces several torch kernels):

* ``add_rmsnorm``: residual add + RMSNorm in one pass over the row;
* ``silu_mul``: SiLU(gate) · up from the fused gate/up projection;
* ``rotary_inplace``: rotary embedding of the q and k heads of a fused qkv row.

Each rounds to the activation dtype where the torch version does, so results match
the unfused layers (bit for bit in float32; to bf16 rounding otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, n, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    tl.store(res_out_ptr + row * n + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / n
    normed = (h * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(
        out_ptr + row * n + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask
    )


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [T, N] (rows contiguous)."""
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(t,)](
        x, res, weight, out, res_out, x.stride(0), res.stride(0), n, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return out, res_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n
    g = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n + col, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * n + col, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2N] = [gate | up] -> [T, N] = SiLU(gate) * up."""
    t, two_n = x.shape
    n = two_n // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_p, num_heads,
    HALF: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    # One program per token, all its rotated heads at once: cos/sin are read once per
    # token, and each program moves num_heads x 2 x HALF values (a program per head
    # moved 2 x HALF: 40 times the launches for the same bytes).
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF)
    heads = tl.arange(0, HEADS)
    mask = (heads < num_heads)[:, None]
    base = qkv_ptr + t * stride_t + heads[:, None] * (2 * HALF) + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    c = tl.load(cos_ptr + pos * stride_p + offs).to(dt).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_p + offs).to(dt).to(tl.float32)[None, :]
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # As torch: x * cos + rotate_half(x) * sin, each product rounded to the dtype.
    o1 = ((f1 * c).to(dt).to(tl.float32) + (-f2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(base, o1, mask=mask)
    tl.store(base + HALF, o2, mask=mask)


def rotary_inplace(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_rot_heads: int,
    head_dim: int,
) -> None:
    """Rotates the first ``num_rot_heads`` heads (q then k) of every qkv row in place.
    cos/sin: [max_positions, head_dim] float32 tables (halves equal)."""
    assert qkv.stride(1) == 1
    _rotary_kernel[(qkv.shape[0],)](
        qkv, positions, cos, sin, qkv.stride(0), cos.stride(0), num_rot_heads,
        HALF=head_dim // 2, HEADS=triton.next_power_of_2(num_rot_heads),
    )  # fmt: skip
