"""Named model shapes: the architectures of the benchmarks (BENCHMARKS.md) as
``LlamaConfig``s, without weights. ``kvserve plan`` sizes KV caches for them; ``bench``
builds synthetic models of them (``bench.synthetic``)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

# BENCHMARKS.md's ``llama3-8b-shape``.
LLAMA3_8B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000,
    max_position_embeddings=8192,
)
# BENCHMARKS.md's ``llama3-70b-shape`` (tensor-parallel runs).
LLAMA3_70B: dict[str, Any] = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b-shape": LLAMA3_8B,
    "llama3-70b-shape": LLAMA3_70B,
    # The smoke test's model: the 8B shape with 2 layers (1.5B parameters, most of
    # them embedding and LM head).
    "llama3-8b-shape-2l": {**LLAMA3_8B, "num_hidden_layers": 2},
    # For running the suite's logic on a CPU (head_dim 16, vocabulary of 512).
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=500000,
        max_position_embeddings=8192,
    ),
}


def make_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of ``MODELS[name]`` (untied embeddings, bf16, EOS = 2)."""
    cfg = LlamaConfig(**MODELS[name], tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg
