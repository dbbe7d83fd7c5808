"""The host-memory KV tier of one rank: where evicted prefix blocks are kept.

Layout, block-major so that one host block is one contiguous copy::

    host[host block]: [layers, 2, block_size, kv_heads_of_this_rank, head_dim]

Pinned on CUDA, so copies run asynchronously to the host on the step's stream. The
block pool (``engine.block_pool``) decides every copy; the scheduler puts them in the
step's description (``SchedulerOutput.spills`` / ``restores``) and every rank runs them,
each on its own head group, before the step's forward: spills (device → host) first,
then restores (host → device). Being on the step's stream, they follow the step before
(whose writes a spill reads) and precede this step's forward (which reads the restored
blocks and overwrites the spilled ones): the host is never waited for.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(first a, first b, length) of the maximal runs where both ids count up by one."""
    runs: list[tuple[int, int, int]] = []
    for a, b in pairs:
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((a, b, 1))
    return runs


class HostKVTier:
    def __init__(self, num_blocks: int, device_stack: torch.Tensor) -> None:
        """``device_stack``: the rank's cache, ``[layers, 2, blocks, block_size, heads,
        dim]`` (``engine.kv_cache.allocate_kv_cache``)."""
        self.device_stack = device_stack
        layers, two, _, bs, heads, dim = device_stack.shape
        pin = device_stack.device.type == "cuda"
        self.host = torch.zeros(num_blocks, layers, two, bs, heads, dim,
                                dtype=device_stack.dtype, pin_memory=pin)  # fmt: skip
        self.num_blocks = num_blocks
        logger.info("host KV tier: %d blocks, %.1f MiB%s", num_blocks,
                    self.host.numel() * self.host.element_size() / 2**20,
                    " pinned" if pin else "")  # fmt: skip

    @torch.inference_mode()
    def copy(self, spills: list[tuple[int, int]], restores: list[tuple[int, int]]) -> None:
        """Runs a step's copies: ``spills`` (device block, host block) and then
        ``restores`` (host block, device block), each list in order (a later copy into
        the same block wins)."""
        stack, dev = self.device_stack, self.device_stack.device
        nb = dev.type != "cpu"
        if spills:
            src = torch.tensor([d for d, _ in spills], dtype=torch.long, device=dev)
            data = stack.index_select(2, src).movedim(2, 0).contiguous()  # [n, L, 2, ...]
            for i, hb, n in _runs([(i, hb) for i, (_, hb) in enumerate(spills)]):
                self.host[hb : hb + n].copy_(data[i : i + n], non_blocking=nb)
        if restores:
            last = {d: i for i, (_, d) in enumerate(restores)}  # a later restore wins
            order = sorted(last.values())
            staging = torch.empty((len(order), *self.host.shape[1:]), dtype=stack.dtype, device=dev)
            for j, hb, n in _runs([(j, restores[i][0]) for j, i in enumerate(order)]):
                staging[j : j + n].copy_(self.host[hb : hb + n], non_blocking=nb)
            dst = torch.tensor([restores[i][1] for i in order], dtype=torch.long, device=dev)
            stack.index_copy_(2, dst, staging.movedim(0, 2))


def num_host_blocks(host_bytes: int, bytes_per_block: int) -> int:
    """Host blocks that ``host_bytes`` hold."""
    return host_bytes // bytes_per_block if bytes_per_block > 0 else 0
