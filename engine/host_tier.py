"""The host-memory KV tier of one rank: where evicted prefix blocks are kept.

Layout, layer-major so that one layer's run of host blocks is one contiguous copy::

    host[layer][host block]: [2, block_size, kv_heads_of_this_rank, head_dim]

The block pool (``engine.block_pool``) decides every copy; the scheduler puts them in the
step's description (``SchedulerOutput.spills`` / ``restores``) and every rank runs them,
each on its own head group, layer by layer: for each layer, spills (device → host) first,
then restores (host → device).

On CUDA the tier is pinned and the copies run on a side stream that first waits for the
work already queued (the step before, whose writes a spill reads) and then records one
event per layer. The step's forward waits for layer ``l``'s event just before layer
``l``'s attention touches the cache (``AttentionMetadata.kv_ready``), so the copies of
later layers overlap the compute of earlier ones, and neither the host nor the step's
first layers wait for the whole transfer. On CPU the copies run in place, in order.
"""

from __future__ import annotations

import logging
from typing import Any

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
        self.cuda = device_stack.device.type == "cuda"
        self.host = torch.zeros(layers, num_blocks, two, bs, heads, dim,
                                dtype=device_stack.dtype, pin_memory=self.cuda)  # fmt: skip
        self.num_blocks = num_blocks
        # CUDA: the copies' stream and one reusable event per layer (a wait binds to the
        # event's latest record at the time it is queued, so reuse across steps is safe).
        self.stream: Any = torch.cuda.Stream(device_stack.device) if self.cuda else None
        self.events: list[Any] = [torch.cuda.Event() for _ in range(layers)] if self.cuda else []
        logger.info("host KV tier: %d blocks, %.1f MiB%s", num_blocks,
                    self.host.numel() * self.host.element_size() / 2**20,
                    " pinned" if self.cuda else "")  # fmt: skip

    def _ids(self, ids: list[int]) -> torch.Tensor:
        """``ids`` on the device without a host sync (through pinned memory on CUDA)."""
        t = torch.tensor(ids, dtype=torch.long)
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device_stack.device, non_blocking=True)

    @torch.inference_mode()
    def copy(
        self, spills: list[tuple[int, int]], restores: list[tuple[int, int]]
    ) -> list[Any] | None:
        """Queues a step's copies: ``spills`` (device block, host block) and then
        ``restores`` (host block, device block), each list in order (a later copy into
        the same block wins). Returns, on CUDA, one event per layer that the step's
        work touching that layer's cache must wait for (``wait``); on CPU the copies are
        done and it returns None."""
        if not spills and not restores:
            return None
        if not self.cuda:
            self._copy(spills, restores)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device_stack.device))
        with torch.cuda.stream(self.stream):
            self._copy(spills, restores)
        return self.events

    def wait(self, events: list[Any] | None) -> None:
        """Makes the current stream wait for every layer's copies (a step that does not
        pass each layer's event to its attention: a graph replay, a copy-only step)."""
        if events:
            torch.cuda.current_stream(self.device_stack.device).wait_event(events[-1])

    def _copy(self, spills: list[tuple[int, int]], restores: list[tuple[int, int]]) -> None:
        stack, host = self.device_stack, self.host
        nb = self.cuda
        spill_runs, data = [], None
        if spills:
            src = self._ids([d for d, _ in spills])
            # [layers, n, 2, ...]: one gather of every layer, then per-layer runs to host.
            data = stack.index_select(2, src).movedim(2, 1).contiguous()
            spill_runs = _runs([(i, hb) for i, (_, hb) in enumerate(spills)])
        restore_runs, dst, staging = [], None, None
        if restores:
            last = {d: i for i, (_, d) in enumerate(restores)}  # a later restore wins
            order = sorted(last.values())
            dst = self._ids([restores[i][1] for i in order])
            restore_runs = _runs([(j, restores[i][0]) for j, i in enumerate(order)])
            staging = torch.empty((len(order), *host.shape[2:]), dtype=stack.dtype,
                                  device=stack.device)  # fmt: skip
        for layer in range(stack.shape[0]):
            if data is not None:
                for i, hb, n in spill_runs:
                    host[layer, hb : hb + n].copy_(data[layer, i : i + n], non_blocking=nb)
            if staging is not None and dst is not None:
                for j, hb, n in restore_runs:
                    staging[j : j + n].copy_(host[layer, hb : hb + n], non_blocking=nb)
                stack[layer].index_copy_(1, dst, staging.movedim(0, 1))
            if self.cuda:
                self.events[layer].record(self.stream)


def num_host_blocks(host_bytes: int, bytes_per_block: int) -> int:
    """Host blocks that ``host_bytes`` hold."""
    return host_bytes // bytes_per_block if bytes_per_block > 0 else 0
