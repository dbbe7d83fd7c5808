"""Attention over the paged KV cache, behind one seam.

``AttentionMetadata`` describes a step's flattened batch; a backend implements
``forward(layer, q, k, v, kv_cache, meta)``. The torch reference here runs on CPU and
CUDA and is the oracle for the Triton kernels of the GPU path.
"""

from typing import Any

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend

__all__ = ["AttentionMetadata", "TorchAttentionBackend", "select_backend"]


def select_backend(name: str, device: torch.device, head_dim: int) -> Any:
    """The backend class for ``name`` ("auto" | "torch" | "triton"): "auto" takes
    Triton on CUDA when it is installed and the head size suits its kernels."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend must be auto, torch or triton; got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend
    try:
        from engine.attention.triton_backend import TritonAttentionBackend, triton_supported
    except ImportError:
        if name == "triton":
            raise
        return TorchAttentionBackend
    if not triton_supported(head_dim):
        if name == "triton":
            raise ValueError(
                f"the Triton kernels need a power-of-two head_dim >= 16, got {head_dim}"
            )
        return TorchAttentionBackend
    return TritonAttentionBackend
