"""Rotary position embedding with a precomputed cos/sin table.

The inverse frequencies come from transformers' own rope initialisers, so every
scaling type they define statically (default, linear, llama3, yarn) matches
Hugging Face exactly. Length-dependent types (dynamic, longrope) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(hf_config: Any) -> str:
    params = (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    return params.get("rope_type", params.get("type", "default"))


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        rope_type = rope_type_of(hf_config)
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: {STATIC_ROPE_TYPES}")
        if rope_type == "default":
            params = getattr(hf_config, "rope_parameters", None) or {}
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (
                base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
            )
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        t = torch.arange(max_positions, dtype=torch.float32)
        inv_freq = inv_freq.to(t.device)
        freqs = torch.outer(t, inv_freq.float())  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        # Plain attributes, not buffers: they stay float32 whatever the model dtype.
        self.cos = emb.cos() * scaling
        self.sin = emb.sin() * scaling
        # The last step's (positions, dtype) and its [T, 1, D] cos/sin rows: every layer
        # of a step rotates at the same positions, so the rows are gathered once.
        self._rows: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T]."""
        rows = self._rows
        if rows is None or rows[0] is not positions or rows[1] != q.dtype:
            cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
            sin = self.sin[positions].unsqueeze(1).to(q.dtype)
            rows = self._rows = (positions, q.dtype, cos, sin)
        cos, sin = rows[2], rows[3]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
