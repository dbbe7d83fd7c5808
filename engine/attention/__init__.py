"""Attention over the paged KV cache, behind one seam.

``AttentionMetadata`` describes a step's flattened batch; a backend implements
``forward(layer, q, k, v, kv_cache, meta)``. The torch reference here runs on CPU and
CUDA and is the oracle for the Triton kernels of the GPU path.
"""

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend

__all__ = ["AttentionMetadata", "TorchAttentionBackend"]
