"""Turns a ``SchedulerOutput`` into tensors, runs the model, returns logits.

Owns the model's weights and the KV cache tensors of one rank. Everything it needs
about a step is in the ``SchedulerOutput``, so a tensor-parallel rank in another
process can run the same step from the same description.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from engine.attention import AttentionMetadata, select_backend
from engine.host_tier import HostKVTier, num_host_blocks
from engine.kv_cache import KVCachePlan, allocate_kv_cache, cache_dtype, plan_kv_cache
from engine.loader import dummy_tensors, load_tensors, load_weights
from engine.models import LlamaForCausalLM
from engine.parallel import TPContext
from engine.pending import fill_pending
from engine.runner_config import RunnerConfig
from engine.scheduler_output import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from engine.cuda_graph import DecodeGraphs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, tp: TPContext | None = None) -> None:
        self.cfg = cfg
        self.tp = tp or TPContext()
        self.device = cfg.device
        self.block_size = cfg.cache.block_size
        self.backend = select_backend(cfg.attention_backend, cfg.device, cfg.model.head_dim)
        self.uses_triton = self.backend.__name__ == "TritonAttentionBackend"
        self.num_sms = (
            torch.cuda.get_device_properties(cfg.device).multi_processor_count
            if cfg.device.type == "cuda"
            else 8
        )
        self.model = build_model(cfg, self.tp, self.backend)
        if self.uses_triton and cfg.device.type == "cuda" and cfg.fused_ops:
            for module in self.model.modules():
                if hasattr(module, "fused"):
                    setattr(module, "fused", True)  # noqa: B010 (mypy sees nn.Module)
        if cfg.load_format == "dummy":
            dtype = next(self.model.parameters()).dtype
            tensors = dummy_tensors(cfg.model.hf_config, cfg.seed, cfg.device, dtype)
            load_tensors(self.model, tensors, "dummy weights")
        elif cfg.load_format == "auto":
            load_weights(self.model, cfg.model_dir)
        else:
            raise ValueError(f"load_format must be auto or dummy, got {cfg.load_format!r}")
        self.model.eval()
        self.kv_caches: list[torch.Tensor] = []
        self.plan: KVCachePlan | None = None
        self.host_tier: HostKVTier | None = None
        if cfg.cache.kv_cache:
            layers = self.model.attention_layers()
            plan = plan_kv_cache(cfg, layers[0].num_kv_heads, self.weight_bytes)
            # Block ids must mean the same slots on every rank: all take the smallest count.
            agreed = self.tp.min_int(plan.num_blocks, cfg.device)
            if agreed != plan.num_blocks:
                logger.info("rank %d: %d blocks agreed by the group (%d fit here)",
                            self.tp.rank, agreed, plan.num_blocks)  # fmt: skip
                plan = replace(plan, num_blocks=agreed,
                               max_concurrent_seqs=agreed * plan.block_size / cfg.scheduler.max_model_len)  # fmt: skip
            self.plan = plan
            stack = allocate_kv_cache(self.plan, layers, cfg.device, cache_dtype(cfg))
            self.kv_caches = list(stack.unbind(0))
            block_bytes = stack[:, :, 0].numel() * stack.element_size()
            # Host-tier block ids too mean the same slots on every rank.
            host = self.tp.min_int(num_host_blocks(cfg.cache.host_kv_cache_bytes, block_bytes),
                                   cfg.device)  # fmt: skip
            if host > 0 and cfg.cache.enable_prefix_caching:
                self.host_tier = HostKVTier(host, stack)
            if cache_dtype(cfg) == torch.float8_e4m3fn and cfg.kv_calibration_ids:
                self.calibrate_kv_scales(list(cfg.kv_calibration_ids))
        self.graphs: DecodeGraphs | None = None
        if (
            self.uses_triton
            and cfg.device.type == "cuda"
            and cfg.cache.kv_cache
            and not cfg.enforce_eager
        ):
            from engine.cuda_graph import DecodeGraphs  # needs Triton: import only here

            self.graphs = DecodeGraphs(
                self.model, self.model.attention_layers()[0].num_kv_heads, self.block_size,
                cfg.scheduler.max_num_seqs, cfg.scheduler.max_model_len, self.num_sms,
            )  # fmt: skip
            self.graphs.capture()
        if self.uses_triton and cfg.device.type == "cuda" and cfg.cache.kv_cache:
            self.warm_up_kernels()

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks if self.plan is not None else 0

    @property
    def num_host_blocks(self) -> int:
        return self.host_tier.num_blocks if self.host_tier is not None else 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (tied parameters counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids [T], positions [T], attention metadata, rows to sample [S])."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for s in out.scheduled:
            n = s.num_new_tokens
            ids.extend(s.token_ids)
            pos = range(s.start_pos, s.start_pos + n)
            positions.extend(pos)
            if out.use_cache:
                table = s.block_ids
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(s.start_pos + n)
            if s.needs_sample:
                sample_rows.append(starts[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=starts,
            seq_lens=seq_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev)
            if out.use_cache
            else None,
            block_tables=[s.block_ids for s in out.scheduled],
            block_size=bs,
            use_cache=out.use_cache,
        )
        if self.uses_triton and out.use_cache:
            from engine.attention.triton_backend import build_step_data

            kv_heads = self.model.attention_layers()[0].num_kv_heads
            meta.triton = build_step_data(
                starts, seq_lens, meta.block_tables, kv_heads, self.num_sms, dev
            )
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def calibrate_kv_scales(self, token_ids: list[int], headroom: float = 2.0) -> None:
        """Sets each layer's FP8 scales from one forward over ``token_ids`` (no cache):
        scale = headroom × max|x| / 448, so the largest value seen maps to 448 / headroom.
        Runs before CUDA graphs are captured (the kernels take the scales as scalars)."""
        layers = self.model.attention_layers()
        for layer in layers:
            layer.kv_amax = [0.0, 0.0]
        n = len(token_ids)
        meta = AttentionMetadata([0, n], [n], None, [[]], self.block_size, use_cache=False)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        self.model(ids, torch.arange(n, device=self.device), meta)
        for layer in layers:
            assert layer.kv_amax is not None
            k_amax, v_amax = layer.kv_amax
            layer.attn.k_scale = max(headroom * k_amax / 448.0, 1e-8)
            layer.attn.v_scale = max(headroom * v_amax / 448.0, 1e-8)
            layer.kv_amax = None
        logger.info("FP8 KV scales from %d calibration tokens: k %s, v %s", n,
                    [round(la.attn.k_scale, 4) for la in layers[:4]],
                    [round(la.attn.v_scale, 4) for la in layers[:4]])  # fmt: skip

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Compiles every Triton kernel variant a step can meet (short and long prefill
        tiles, decode rows beside prefill rows) before the first request, so no JIT
        compile lands in a request's latency. Writes nothing: every slot is -1."""
        t0 = time.perf_counter()
        for q_lens in ([8], [48], [1, 1, 8]):
            scheduled = [
                ScheduledRequest(f"warm-{i}", [0] * n, 0, [0] * -(-n // self.block_size), n > 1)
                for i, n in enumerate(q_lens)
            ]
            out = SchedulerOutput(scheduled=scheduled, num_batched_tokens=sum(q_lens))
            input_ids, positions, meta, rows = self.prepare(out)
            assert meta.slot_mapping is not None
            meta.slot_mapping.fill_(-1)
            self.model.compute_logits(self.model(input_ids, positions, meta)[rows])
        torch.cuda.synchronize(self.device)
        logger.info("warmed up kernels in %.1f s", time.perf_counter() - t0)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Runs one step; returns float32 logits [S, vocab] of the rows that sample,
        in the order of ``out.scheduled`` (requests with ``needs_sample``).
        ``prev_tokens``: the previous step's sampled tokens, still on the device, that
        ``out``'s ``PENDING`` ids are (``out.pending_sources`` says which row each).
        The step's host-tier copies are queued first; each layer's attention waits for
        its own layer's copies (``HostKVTier``)."""
        ready, tier = None, self.host_tier
        if out.spills or out.restores:
            assert tier is not None, "a host-tier copy without a host tier"
            ready = tier.copy(out.spills, out.restores)
        graph = self.graphs if self.graphs is not None and self.graphs.can_run(out) else None
        if ready is not None and tier is not None and (graph is not None or not out.scheduled):
            tier.wait(ready)  # no per-layer waits on these paths: wait for all copies
        if not out.scheduled:
            return torch.empty(0, self.cfg.model.vocab_size, device=self.device)
        if graph is not None:
            return graph.run(out, prev_tokens)
        input_ids, positions, meta, sample_rows = self.prepare(out)
        meta.kv_ready = ready
        fill_pending(input_ids, out, prev_tokens)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[sample_rows])


def build_model(cfg: RunnerConfig, tp: TPContext, backend: Any) -> LlamaForCausalLM:
    """Constructs the (uninitialised) model directly on its device and in its dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(cfg.device):
            return LlamaForCausalLM(cfg.model, cfg.scheduler.max_model_len, tp, backend)
    finally:
        torch.set_default_dtype(default)
