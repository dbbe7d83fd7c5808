"""Fused elementwise kernels against the unfused torch layers (float32: exact up to
reduction order; on CUDA also bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine.layers.norm import RMSNorm
from engine.layers.rotary import _rotate_half
from engine.layers.triton_fused import add_rmsnorm, rotary_inplace, silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm(dtype: torch.dtype, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g).to(DEVICE, dtype)
    r = torch.randn(7, 96, generator=g).to(DEVICE, dtype) if with_residual else None
    norm = RMSNorm(96, 1e-5).to(DEVICE, dtype)
    norm.weight.data = torch.rand(96, generator=g).to(DEVICE, dtype)
    ref_out, ref_res = norm(x, r)
    out, res = add_rmsnorm(x, r, norm.weight, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(
        out, ref_out, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    x = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(
        silu_mul(x), F.silu(gate) * up, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_inplace(dtype: torch.dtype) -> None:
    t, hq, hk, d = 6, 4, 2, 16
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(DEVICE, dtype)
    pos = torch.tensor([0, 5, 9, 3, 31, 2], device=DEVICE)
    freqs = torch.outer(torch.arange(32.0), 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    emb = torch.cat((freqs, freqs), -1).to(DEVICE)
    cos, sin = emb.cos(), emb.sin()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    c, s = cos[pos].unsqueeze(1).to(dtype), sin[pos].unsqueeze(1).to(dtype)
    ref_q, ref_k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    v_before = qkv[:, (hq + hk) * d :].clone()
    rotary_inplace(qkv, pos, cos, sin, hq + hk, d)
    # bf16: the two products may round one step apart, and their sum can cancel.
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 1e-2}
    torch.testing.assert_close(q, ref_q, **tol)
    torch.testing.assert_close(k, ref_k, **tol)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)  # V untouched
