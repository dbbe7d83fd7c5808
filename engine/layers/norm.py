"""RMSNorm computed in float32, as transformers' Llama does."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.fused = False  # set by the runner on the GPU path (one Triton kernel)
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(norm(x + residual), x + residual)``; ``residual=None`` means 0."""
        if self.fused:
            from engine.layers.triton_fused import add_rmsnorm

            return add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), residual
