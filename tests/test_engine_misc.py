"""Start-up arithmetic, model resolution and caching, streaming, the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, RequestOutputKind, SamplingParams


def test_kv_cache_arithmetic_is_logged(
    tiny_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.kv_cache")
    # Tiny llama: 2 layers × 2 × 4 kv heads × 8 head_dim × 4 bytes = 512 bytes/token.
    llm = LLM(
        tiny_dirs["llama3"], device="cpu", max_model_len=256, cpu_kv_cache_bytes=512 * 16 * 100
    )
    assert llm.engine.runner.num_blocks == 100
    text = caplog.text
    assert "2 layers × 2 × 4 kv heads × 8 head_dim × 4 bytes = 512 bytes/token" in text
    assert "100 blocks of 16 tokens (1600 tokens); 6.2 sequences of max_model_len=256" in text


def test_pool_too_small_for_one_sequence_is_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(tiny_dirs["llama3"], device="cpu", max_model_len=256, num_blocks=4)


def test_gguf_conversion_is_cached(smollm2_dir: Path) -> None:
    from engine.loader import resolve_model

    t0 = time.perf_counter()
    assert resolve_model(None) == smollm2_dir
    assert time.perf_counter() - t0 < 2.0
    assert (smollm2_dir / "model.safetensors").exists() and (
        smollm2_dir / "tokenizer.json"
    ).exists()


def test_streamed_text_only_grows_and_never_shows_a_stop_string(smollm2_llm: Any) -> None:
    engine = smollm2_llm.engine
    prompt = "Count: 1, 2, 3, 4,"
    full = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    )[0]
    stop = full.outputs[0].text[6:10]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append(out.outputs[0].text)
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(seen))
    assert all(stop not in s for s in seen)
    assert seen[-1] == full.outputs[0].text[:6]


def test_final_only_requests_get_one_output_with_the_streamed_text(smollm2_llm: Any) -> None:
    engine = smollm2_llm.engine
    prompt = "The capital of France is"
    streamed = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    final = dataclasses.replace(streamed, output_kind=RequestOutputKind.FINAL_ONLY)
    a = engine.add_request(prompt, streamed)
    b = engine.add_request(prompt, final)
    seen: dict[str, list[Any]] = {a: [], b: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen[a]) == 12 and len(seen[b]) == 1 and seen[b][0].finished
    assert seen[b][0].outputs[0].token_ids == seen[a][-1].outputs[0].token_ids
    assert seen[b][0].outputs[0].text == seen[a][-1].outputs[0].text
    assert engine.pool_is_whole()


def test_chat_applies_the_template(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(tiny_dirs["llama3"], device="cpu", max_model_len=128)
    out = llm.chat(
        [{"role": "user", "content": "w7 w8"}],
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    )
    assert out[0].prompt_token_ids == [1, 7, 8, 3]
    assert out[0].outputs[0].text == " ".join(f"w{t}" for t in out[0].outputs[0].token_ids)


def test_cli_generates_with_the_default_model(smollm2_dir: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "generate",
            "The capital of France is",
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Paris" in res.stdout
    assert "8 tokens" in res.stdout or "finish: stop" in res.stdout


def test_fp8_cache_holds_more_tokens_and_stays_close(smollm2_dir: Path) -> None:
    budget = 2**26
    full = LLM(smollm2_dir, device="cpu", max_model_len=512, cpu_kv_cache_bytes=budget)
    fp8 = LLM(
        smollm2_dir,
        device="cpu",
        max_model_len=512,
        cpu_kv_cache_bytes=budget,
        kv_cache_dtype="fp8",
    )
    # float32 model: 4 bytes per value against 1.
    assert fp8.engine.runner.num_blocks == 4 * full.engine.runner.num_blocks
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    # Per-layer scales were calibrated at start-up (1.0 would push small V values
    # into e4m3's subnormal range), and differ across layers.
    scales = [(a.attn.k_scale, a.attn.v_scale) for a in fp8.engine.runner.model.attention_layers()]
    assert all(k != 1.0 and v != 1.0 for k, v in scales) and len(set(scales)) > 1
    prompts = [
        "The capital of France is",
        "def add(a, b):",
        "Water boils at",
        "My favourite colour is",
    ]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in full.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in fp8.generate(prompts, params)]
    # e4m3 keeps ~2 significant digits: the first tokens agree, later ones may drift.
    assert sum(x[:6] == y[:6] for x, y in zip(a, b, strict=True)) >= 3
    assert fp8.engine.pool_is_whole()


def test_kv_cache_dtype_is_validated(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny_dirs["llama3"], device="cpu", kv_cache_dtype="int4")
