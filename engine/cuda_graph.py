"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode-only step (every scheduled request adds one token) has a fixed shape once
its batch is padded to a bucket, so the whole forward plus the LM head is captured
once per bucket and replayed: no Python and no kernel launches per layer. Inputs
live in static device buffers the step fills; padding rows have slot -1 (no KV write)
and length 0 (no attention). The decode kernel's split-K layout is fixed per bucket
from ``max_model_len`` so a graph serves every context length.

Used only with the Triton backend (its metadata is all device tensors).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.attention import AttentionMetadata
from engine.attention.metadata import padded_tables
from engine.attention.triton_backend import DecodeBatch, TritonStepData, decode_splits
from engine.pending import fill_pending
from engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (which is included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_heads: int,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        num_sms: int,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        dev = next(model.parameters()).device
        self.device = dev
        n, width = max_batch, -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.int32, device=dev)
        # Pinned host staging: filled on the CPU, copied without blocking. Before refilling
        # them, ``run`` waits for the previous step's copies (``_staged``): free when the
        # caller synced since (rank 0 reads its sampled tokens), needed on ranks that do not.
        self._host_long = torch.zeros(3, n, dtype=torch.long, pin_memory=True)
        self._host_lens = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=True)
        self._staged: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # One output buffer for every bucket (a graph's own output would stay alive per bucket).
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=dev)
        self._kv_heads = kv_heads
        self._num_sms = num_sms

    def _meta(self, b: int) -> AttentionMetadata:
        splits, split_len = decode_splits(self.max_model_len, b, self._kv_heads, self._num_sms)
        decode = DecodeBatch(
            self.rows[:b], self.block_tables[:b], self.seq_lens[:b], splits, split_len
        )
        return AttentionMetadata(
            query_start_loc=[],
            seq_lens=[],
            slot_mapping=self.slots[:b],
            block_tables=[],
            block_size=self.block_size,
            triton=TritonStepData(decode=decode, prefill=None),
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, sharing one memory pool."""
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[:b].copy_(self._forward(b))
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch %s) in %.1f s", len(self.buckets), self.buckets,
                    time.perf_counter() - t0)  # fmt: skip

    def can_run(self, out: SchedulerOutput) -> bool:
        return (
            out.use_cache
            and 0 < len(out.scheduled) <= self.buckets[-1]
            and all(s.num_new_tokens == 1 for s in out.scheduled)
        )

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, vocab] of the requests that sample, in scheduled order;
        ``PENDING`` ids come from ``prev_tokens`` (``ModelRunner.execute``)."""
        n = len(out.scheduled)
        b = next(x for x in self.buckets if x >= n)
        bs = self.block_size
        ids, pos, slots = [], [], []
        for s in out.scheduled:
            p = s.start_pos
            ids.append(s.token_ids[0])
            pos.append(p)
            slots.append(s.block_ids[p // bs] * bs + p % bs)
        if self._staged is not None:
            self._staged.synchronize()  # the last step's copies have left the staging buffers
        host = self._host_long[:, :n]
        host_np = host.numpy()
        host_np[0], host_np[1], host_np[2] = ids, pos, slots
        self._host_lens[:n].numpy()[:] = host_np[1] + 1
        width = padded_tables(
            [s.block_ids for s in out.scheduled], self._host_tables.numpy()
        ).shape[1]
        self.input_ids[:n].copy_(host[0], non_blocking=True)
        self.positions[:n].copy_(host[1], non_blocking=True)
        self.slots[:n].copy_(host[2], non_blocking=True)
        self.seq_lens[:n].copy_(self._host_lens[:n], non_blocking=True)
        self.block_tables[:n, :width].copy_(self._host_tables[:n, :width], non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        fill_pending(self.input_ids, out, prev_tokens)
        if b > n:
            self.slots[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(0)
        self.graphs[b].replay()
        logits = self.logits[:n]
        if all(s.needs_sample for s in out.scheduled):
            return logits
        keep = [i for i, s in enumerate(out.scheduled) if s.needs_sample]
        return logits[torch.tensor(keep, device=logits.device)]
