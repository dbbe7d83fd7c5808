"""Small factories shared by the tests: tiny random HF checkpoints and references."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from bench.common import free_port
from bench.synthetic import save_word_tokenizer

TINY_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    initializer_range=0.2,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)

TINY_CONFIGS: dict[str, Any] = {
    "llama3": lambda: LlamaConfig(
        **TINY_COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    ),
    "mistral": lambda: MistralConfig(**TINY_COMMON, sliding_window=8, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**TINY_COMMON, tie_word_embeddings=True),
    "qwen2-mixed-window": lambda: Qwen2Config(
        **TINY_COMMON,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        tie_word_embeddings=True,
    ),
    "llama-mqa": lambda: LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 1}),
    # head_dim 16: the smallest the Triton kernels take.
    "llama-hd16": lambda: LlamaConfig(
        **{**TINY_COMMON, "num_attention_heads": 4, "num_key_value_heads": 2}
    ),
    "mistral-hd16": lambda: MistralConfig(
        **{**TINY_COMMON, "num_attention_heads": 4, "num_key_value_heads": 1}, sliding_window=8
    ),
}


def save_tiny_model(name: str, out: Path, max_shard_size: str | None = None) -> Path:
    """Builds a seeded random model of ``TINY_CONFIGS[name]`` and saves it, with the
    tiny tokenizer, as an HF directory."""
    torch.manual_seed(1234)
    config = TINY_CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    save_word_tokenizer(out, config.vocab_size)
    return out


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` with EOS ignored (not suppressed, as
    ``min_new_tokens`` would): exactly max_new_tokens tokens, like ``ignore_eos``."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(prompt_ids) :].tolist()


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


@contextmanager
def serving(**config: Any) -> Iterator[Any]:
    """The kvserve Serve application on loopback (free HTTP port, gRPC off unless
    ``grpc_port`` is given) for the body of the ``with``; yields its ``ServeConfig``."""
    from ray import serve

    from cluster.app import run
    from cluster.config import ServeConfig

    cfg = ServeConfig(**{"device": "cpu", "http_port": free_port(), "grpc_port": 0, **config})
    try:
        run(cfg)
        yield cfg
    finally:
        serve.shutdown()
