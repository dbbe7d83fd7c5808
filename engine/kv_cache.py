"""Sizing and allocating the paged KV cache of one rank.

Per token the cache holds ``layers × 2 × kv_heads × head_dim × dtype_bytes``; the
number of blocks is the memory budget divided by the bytes of one block. On CPU the
budget is ``cpu_kv_cache_bytes``; on GPU it is ``gpu_memory_utilization`` × device
memory minus the weights and the activation peak of a profiling step. The
arithmetic is logged at start-up.

Layout, one tensor per layer (so a tensor-parallel rank holds only its KV heads)::

    kv_cache[layer]: [2, num_blocks, block_size, kv_heads_of_this_rank, head_dim]
                      K/V   block id   slot in block
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.runner_config import RunnerConfig

if TYPE_CHECKING:
    from engine.models.llama import LlamaAttention

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    num_blocks: int
    block_size: int
    bytes_per_token: int
    budget_bytes: int
    max_concurrent_seqs: float  # at max_model_len

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv_cache(cfg: RunnerConfig, kv_heads_per_rank: int, weight_bytes: int) -> KVCachePlan:
    dtype_bytes = torch.empty((), dtype=cache_dtype(cfg)).element_size()
    per_token = cfg.model.kv_bytes_per_token(dtype_bytes, kv_heads_per_rank)
    bs = cfg.cache.block_size
    if cfg.cache.num_blocks_override is not None:
        num_blocks = cfg.cache.num_blocks_override
        budget = num_blocks * bs * per_token
    else:
        budget = _budget_bytes(cfg, weight_bytes)
        num_blocks = budget // (per_token * bs)
    max_len = cfg.scheduler.max_model_len
    if num_blocks * bs < max_len:
        raise ValueError(
            f"KV cache of {num_blocks} blocks × {bs} tokens cannot hold one sequence of "
            f"max_model_len={max_len}; raise the memory budget or lower max_model_len"
        )
    plan = KVCachePlan(num_blocks, bs, per_token, budget, num_blocks * bs / max_len)
    logger.info(
        "KV cache: %d layers × 2 × %d kv heads × %d head_dim × %d bytes = %d bytes/token; "
        "budget %.1f MiB -> %d blocks of %d tokens (%d tokens); %.1f sequences of max_model_len=%d",
        cfg.model.num_layers, kv_heads_per_rank, cfg.model.head_dim, dtype_bytes, per_token,
        budget / 2**20, num_blocks, bs, plan.num_tokens, plan.max_concurrent_seqs, max_len,
    )  # fmt: skip
    return plan


def cache_dtype(cfg: RunnerConfig) -> torch.dtype:
    """The cache's element type: the model's, or float8 e4m3 for ``kv_cache_dtype="fp8"``."""
    return torch.float8_e4m3fn if cfg.cache.kv_cache_dtype == "fp8" else cfg.dtype


def _budget_bytes(cfg: RunnerConfig, weight_bytes: int) -> int:
    """GPU: ``utilization × total`` minus memory outside torch (CUDA context, other
    processes), minus every live torch tensor of this process (the weights included),
    minus an activation estimate. Torch's cached-but-free blocks count as free."""
    if cfg.device.type != "cuda":
        return cfg.cache.cpu_kv_cache_bytes
    gc.collect()  # engines dropped by the caller release their caches first
    free, total = torch.cuda.mem_get_info(cfg.device)
    outside_torch = total - free - torch.cuda.memory_reserved(cfg.device)
    live = torch.cuda.memory_allocated(cfg.device)
    # Activations of the largest step, estimated from its shape: hidden and MLP
    # activations of max_num_batched_tokens, float32 logits of max_num_seqs.
    m = cfg.model
    dtype_bytes = torch.empty((), dtype=cfg.dtype).element_size()
    tokens = cfg.scheduler.max_num_batched_tokens
    activations = tokens * (4 * m.hidden_size + 3 * m.intermediate_size) * dtype_bytes * 2
    activations += cfg.scheduler.max_num_seqs * m.vocab_size * 4 * 3
    budget = int(total * cfg.cache.gpu_memory_utilization) - outside_torch - live - activations
    logger.info(
        "GPU memory: total %.1f GiB × %.2f; outside torch %.2f GiB, live tensors %.2f GiB "
        "(weights %.2f GiB), activations ~%.2f GiB",
        total / 2**30, cfg.cache.gpu_memory_utilization, outside_torch / 2**30, live / 2**30,
        weight_bytes / 2**30, activations / 2**30,
    )  # fmt: skip
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
            "raise gpu_memory_utilization or free the device"
        )
    return budget


def allocate_kv_cache(
    plan: KVCachePlan, layers: list[LlamaAttention], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Allocates the cache of every layer, binds each layer to its own and returns them
    all as one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``.

    The layers' caches are consecutive views of it (``stack.unbind(0)``), so that a
    request's blocks of every layer can be gathered or scattered by one kernel (KV
    transfer, ``workers.kv_transfer.layer_stack``; the host tier)."""
    if not layers:
        raise ValueError("a model without attention layers has no KV cache")
    heads, dim = layers[0].num_kv_heads, layers[0].head_dim
    if any((layer.num_kv_heads, layer.head_dim) != (heads, dim) for layer in layers):
        raise ValueError("every layer must have the same KV heads and head size")
    stack = torch.zeros(
        len(layers), 2, plan.num_blocks, plan.block_size, heads, dim, dtype=dtype, device=device
    )
    for layer, cache in zip(layers, stack.unbind(0), strict=True):
        layer.kv_cache = cache
    return stack
