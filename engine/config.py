"""Frozen configuration objects, validated once at construction and passed down.

``ModelConfig`` is the engine's own view of a Hugging Face ``PretrainedConfig``: only
the fields our Llama-family modules read, checked for support at load time so an
unsupported checkpoint fails before any weight is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# model_type -> behaviour differences inside the Llama family.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of one Llama-family model (all sizes are for the full model, TP=1)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # None for full attention; otherwise a query at position p sees keys at
    # positions k with p - k < window (transformers' convention).
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    # The original HF config, kept for transformers' rope helpers. Not compared.
    hf_config: Any = field(compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Builds the engine view of ``hf``; raises ``ValueError`` if unsupported."""
        model_type = getattr(hf, "model_type", None)
        archs = getattr(hf, "architectures", None) or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} "
                f"(architectures={archs}); kvserve supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
        num_layers = hf.num_hidden_layers
        num_heads = hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads {num_heads} not a multiple of kv heads {num_kv_heads}"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=model_type == "llama" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_windows=_sliding_windows(hf, model_type, num_layers),
            eos_token_ids=_as_tuple(getattr(hf, "eos_token_id", None)),
            hf_config=hf,
        )

    @property
    def num_params(self) -> int:
        """Parameters of the whole model (embeddings and LM head counted once if tied)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += h if self.o_bias else 0
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def check_tensor_parallel(self, size: int) -> None:
        """Raises ``ValueError`` unless ``size`` ranks can split this model: attention
        heads and MLP width divide evenly; KV heads divide evenly, or ``size`` is a
        multiple of them (each KV head is then replicated on ``size / kv_heads`` ranks)."""
        problems = []
        if self.num_heads % size:
            problems.append(f"{self.num_heads} attention heads")
        if self.intermediate_size % size:
            problems.append(f"intermediate size {self.intermediate_size}")
        if self.num_kv_heads % size and size % self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads (nor is {size} a multiple of them)")
        if problems:
            raise ValueError(f"tensor_parallel_size={size} does not divide {', '.join(problems)}")

    def kv_bytes_per_token(self, dtype_bytes: int, num_kv_heads: int | None = None) -> int:
        """layers × 2 (K and V) × kv_heads × head_dim × dtype bytes."""
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        return self.num_layers * 2 * heads * self.head_dim * dtype_bytes


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def _sliding_windows(hf: Any, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and window:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type == "mistral" and window:
        return (window,) * num_layers
    return (None,) * num_layers


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache settings.

    On CPU the cache gets ``cpu_kv_cache_bytes``; on GPU it gets what is left of
    ``gpu_memory_utilization`` × device memory after weights and a profiling step.
    ``num_gpu_blocks_override`` fixes the block count (tests use tiny pools).
    ``kv_cache=False`` is the recompute-everything mode used to show what the cache buys.
    """

    block_size: int = 16
    cpu_kv_cache_bytes: int = 2 * 1024**3
    gpu_memory_utilization: float = 0.9
    num_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache: bool = True
    # "auto": the model's dtype; "fp8": float8 e4m3 with a scale per layer (half the bytes).
    kv_cache_dtype: str = "auto"
    # The host-memory tier (pinned on GPU machines): evicted prefix blocks spill there
    # and hits restore them by copy. 0: no tier.
    host_kv_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError("num_blocks_override must be >= 1")
        if self.host_kv_cache_bytes < 0:
            raise ValueError("host_kv_cache_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous-batching limits: one token budget per step shared by all requests."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # "projected": admit a request only while the free blocks cover what every admitted
    # request holds plus what its decode may still need (``engine.kv_budget``): no
    # preemption at the plan. "committed": count only the blocks a step needs now
    # (vLLM's way: more requests start, and decode growth preempts the newest).
    kv_admission: str = "projected"
    # Decode tokens reserved ahead for a request without ``max_tokens`` (a watermark).
    unbounded_reserve_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.kv_admission not in ("projected", "committed"):
            raise ValueError(
                f"kv_admission must be projected or committed, got {self.kv_admission!r}"
            )
        if self.unbounded_reserve_tokens < 0:
            raise ValueError("unbounded_reserve_tokens must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """Everything needed to start an engine; validated by the configs it builds."""

    model: str | os.PathLike[str] | None = None  # None: the default model (SmolLM2)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = (
        "auto"  # "auto" (float32 on CPU, bfloat16 on GPU) | "float32" | "bfloat16" | "float16"
    )
    block_size: int = 16
    max_model_len: int | None = None  # None: min(config's max positions, 8192)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(2048, max_model_len) without chunking
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_cache: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (model dtype) | "fp8" (e4m3, per-layer scales)
    # The KV cache's size on CPU (default 2 GiB; ``KVSERVE_CPU_KV_CACHE_BYTES`` changes
    # the default, e.g. for a test suite that runs many small engines at once).
    cpu_kv_cache_bytes: int = field(default_factory=lambda: int(
        os.environ.get("KVSERVE_CPU_KV_CACHE_BYTES", str(2 * 1024**3))))  # fmt: skip
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None
    # Bytes of host memory (per rank) for the KV host tier: evicted prefixes spill there
    # and are restored by copy instead of recomputed (0: no tier).
    host_kv_cache_bytes: int = 0
    # "projected" (admit on held + projected decode blocks; no preemption at the plan)
    # or "committed" (admit on what a step needs now; decode growth preempts).
    kv_admission: str = "projected"
    unbounded_reserve_tokens: int = 256  # decode tokens reserved for a request without max_tokens
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks of the worker group (one per GPU, or CPU process)
    distributed_executor_backend: str | None = None  # None: "local" at TP 1, "ray" above
    distributed_timeout_s: float = 300.0  # a collective waiting longer than this fails
    attention_backend: str = "auto"  # "auto" (Triton on CUDA) | "torch" | "triton"
    load_format: str = "auto"  # "auto" | "dummy" (seeded random weights, for benchmarks)
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    fused_ops: bool = True  # fused Triton elementwise kernels on the GPU path
    # Schedule step N+1 while step N runs on the GPU (greedy steps' tokens stay on the
    # device; vLLM's async scheduling). None: on with CUDA at TP 1; True forces it on
    # any device (tests run it on the CPU, where it only delays each output one step).
    async_scheduling: bool | None = None
