"""Llama-family decoder (Llama incl. llama3 rope scaling, Mistral's sliding window,
Qwen2's qkv bias), written on flattened token batches.

Every forward takes ``input_ids [T]`` and ``positions [T]`` for all sequences of a
step concatenated, plus the step's ``AttentionMetadata``; there is no batch axis
and no padding. Tensor parallelism lives only in the layers used here.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, TorchAttentionBackend
from engine.config import ModelConfig
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.parallel import TPContext


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, tp: TPContext, backend: Any
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, tp
        )
        self.rotary = rotary
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.layer_idx = layer_idx
        self.window = cfg.sliding_windows[layer_idx]
        # The attention backend class (torch reference or Triton), chosen by the runner.
        self.attn = backend(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
        # Bound once by the model runner: [2, num_blocks, block_size, kv_heads, head_dim].
        self.kv_cache: torch.Tensor | None = None
        # While calibrating FP8 scales: the largest |K| and |V| seen (else None).
        self.kv_amax: list[float] | None = None
        self.fused = False  # set by the runner on the GPU path (Triton rotary)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused:  # rotate q and k heads in place, one kernel
            from engine.layers.triton_fused import rotary_inplace

            heads = self.num_heads + self.num_kv_heads
            rotary_inplace(qkv, positions, self.rotary.cos, self.rotary.sin, heads, self.head_dim)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if not self.fused:
            q, k = self.rotary(positions, q, k)
        if self.kv_amax is not None:
            self.kv_amax[0] = max(self.kv_amax[0], k.abs().max().item())
            self.kv_amax[1] = max(self.kv_amax[1], v.abs().max().item())
        if meta.kv_ready is not None:  # this layer's host-tier copies
            torch.cuda.current_stream().wait_event(meta.kv_ready[self.layer_idx])
        o = self.attn.forward(q, k, v.contiguous(), self.kv_cache, meta, self.window)
        return self.o_proj(o.reshape(t, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, cfg.mlp_bias, tp
        )
        self.fused = False  # set by the runner on the GPU path (Triton SiLU·mul)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from engine.layers.triton_fused import silu_mul

            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, tp: TPContext, backend: Any
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary, tp, backend)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPContext, backend: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, rotary, tp, backend) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Checkpoint name fragment -> (our fused parameter fragment, shard id).
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int,
        tp: TPContext | None = None,
        backend: Any = TorchAttentionBackend,
    ) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions, tp, backend)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of every token."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab]."""
        return self.lm_head.compute_logits(hidden).float()

    def attention_layers(self) -> list[LlamaAttention]:
        return [cast(LlamaDecoderLayer, layer).self_attn for layer in self.model.layers]
