"""Synthetic models for speed runs: a config, a word-level tokenizer, no weights.

``write_model_dir(config, out)`` writes ``config.json`` and a tokenizer whose token ``i``
is the word ``w{i}``; our engine loads it with ``load_format="dummy"`` (seeded random
weights built on the device), the HF peer with ``AutoModelForCausalLM.from_config``.
``Shape`` holds the sizes the floors and FLOP counts are computed from; ``w1_floor``
is W1's floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from bench.common import ModelFacts


def save_word_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token ``i`` is the word ``w{i}`` (``w2`` is EOS,
    ``w0`` unknown, a one-line chat template): every id of the vocabulary decodes, no
    download needed. The tests' tiny models use it too."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", unk_token="w0")
    fast.chat_template = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w3"
    fast.save_pretrained(out)


def write_model_dir(config: LlamaConfig, out: Path) -> Path:
    """``out`` with ``config.json`` and the word-level tokenizer of ``config.vocab_size``;
    no weights (load it with ``load_format="dummy"``)."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_word_tokenizer(out, config.vocab_size)
    return out


@dataclass(frozen=True, slots=True)
class Shape:
    """Sizes of a Llama-family model, for parameter counts, floors and FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Any) -> Shape:
        heads = cfg.num_attention_heads
        return cls(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    @property
    def body_params(self) -> int:
        """Decoder layers and the final norm: q, k, v, o, gate, up, down, two norms."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (2 * q + 2 * kv)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Every distinct parameter (embedding and LM head once each unless tied)."""
        return self.body_params + self.head_params * (1 if self.tied else 2)

    @property
    def matmul_params(self) -> int:
        """Parameters a token passes through: the body and the LM head."""
        return self.body_params + self.head_params

    def facts(self, dtype_bytes: int) -> ModelFacts:
        kv = self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes
        return ModelFacts(self.matmul_params, self.matmul_params * dtype_bytes, kv)

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs to prefill one prompt of ``tokens`` and produce its first logits:
        2 × body params × tokens + 2 × LM head params (one row of logits) + causal
        attention 2 (QKᵀ and PV) × 2 × layers × heads × head_dim × tokens² / 2."""
        attn = 2 * self.layers * self.heads * self.head_dim * tokens**2
        return 2.0 * self.body_params * tokens + 2.0 * self.head_params + attn


def w1_floor(
    shape: Shape, dtype_bytes: int, lens: list[int], output_len: int, ceilings: dict[str, Any]
) -> dict[str, float]:
    """Least time for W1 on this hardware, all requests decoding in one batch.

    prefill_s = Σ over prompts of ``Shape.prefill_flops(p)`` / matmul rate.
    decode_s = Σ over the output_len - 1 decode steps k = 0, 1, ... of
    max((weight bytes + KV bytes of Σ_r (p_r + k + 1) positions) / copy rate,
    2 × matmul params × requests / matmul rate): each step reads the weights once and
    every request's keys and values, and is never faster than its FLOPs allow.
    floor_s = prefill_s + decode_s.
    """
    facts = shape.facts(dtype_bytes)
    copy, mm = ceilings["copy_bytes_per_s"], ceilings["matmul_flop_per_s"]
    prefill_s = sum(shape.prefill_flops(p) for p in lens) / mm
    compute_s = 2 * facts.matmul_params * len(lens) / mm
    decode_s = sum(
        max((facts.weight_bytes + facts.kv_bytes_per_token * (sum(lens) + len(lens) * (k + 1))) / copy,
            compute_s)
        for k in range(output_len - 1)
    )  # fmt: skip
    return {"prefill_s": prefill_s, "decode_s": decode_s, "floor_s": prefill_s + decode_s}
