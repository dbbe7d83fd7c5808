"""Our engine against Hugging Face transformers on the same weights: greedy tokens
identical, last-step logits close (float32)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineArgs
from tests.factories import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def engine_logits(engine: LLMEngine, prompt_ids: list[int]) -> torch.Tensor:
    """Logits of the token after ``prompt_ids``, computed through the paged cache
    (the prompt is prefilled in chunks when the budget is small)."""
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=1))
    sched = engine.scheduler
    while True:
        out = sched.schedule()
        logits = engine.runner.execute(out)
        sched.update_after_step(out)
        if any(s.needs_sample for s in out.scheduled):
            engine.abort(rid)
            return logits[0]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_llm: Any, smollm2_hf: Any) -> None:
    chat = smollm2_llm.engine.apply_chat_template(
        [{"role": "user", "content": "Name three uses of a cache."}]
    )
    prompts = [*SMOL_PROMPTS, chat]
    outs = smollm2_llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = smollm2_llm.engine.tokenize(prompt)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(smollm2_hf, ids, 64), prompt
        # The streamed-in text is the tokenizer's own decoding of the tokens.
        expected = smollm2_llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        assert out.outputs[0].text == expected


def test_smollm2_stops_at_eos_like_transformers(smollm2_llm: Any, smollm2_hf: Any) -> None:
    chat = smollm2_llm.engine.apply_chat_template([{"role": "user", "content": "Say hi."}])
    ids = smollm2_llm.engine.tokenize(chat)
    out = smollm2_llm.generate([chat], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[
        0, len(ids) :
    ].tolist()
    assert out.token_ids == ref
    assert out.finish_reason == (
        "stop" if ref[-1] in smollm2_llm.engine.eos_token_ids else "length"
    )


def test_smollm2_logits_close(smollm2_dir: Path, smollm2_hf: Any) -> None:
    engine = LLMEngine(
        EngineArgs(model=smollm2_dir, device="cpu", max_model_len=256, max_num_batched_tokens=16)
    )
    ids = engine.tokenize("A paged KV cache keeps keys and values in fixed-size blocks, so that")
    ours = engine_logits(engine, ids)
    ref = smollm2_hf(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert engine.pool_is_whole()


@pytest.mark.parametrize(
    "name", ["llama3", "mistral", "qwen2", "qwen2-mixed-window", "llama-mqa", "llama3-sharded"]
)
def test_tiny_models_match_transformers(name: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Prompts longer than the sliding windows (6, 8) and past llama3's original 32 positions.
    # A seed fixed per model (str hash() changes per process: prompts with a near-tie
    # would make the run flaky, not the engine).
    prompts = random_prompts(4, 20, 60, vocab=512, seed=zlib.crc32(name.encode()) % 1000)
    llm = LLM(path, device="cpu", max_model_len=256, max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
    ours = engine_logits(llm.engine, prompts[0])
    ref = hf(torch.tensor([prompts[0]])).logits[0, -1].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert llm.engine.pool_is_whole()


def test_tiny_configs_exercise_what_they_claim(tiny_dirs: dict[str, Path]) -> None:
    from engine.config import ModelConfig

    cfg = {n: ModelConfig.from_hf(AutoConfig.from_pretrained(p)) for n, p in tiny_dirs.items()}
    assert cfg["mistral"].sliding_windows == (8, 8)
    assert cfg["qwen2-mixed-window"].sliding_windows == (None, 6)
    assert cfg["qwen2"].qkv_bias and cfg["qwen2"].tie_word_embeddings
    assert cfg["llama-mqa"].num_kv_heads == 1
    assert len(list(tiny_dirs["llama3-sharded"].glob("*.safetensors"))) > 1
    assert AutoConfig.from_pretrained(tiny_dirs["llama3"]).rope_parameters["rope_type"] == "llama3"


def test_unsupported_architecture_fails_at_load(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        LLM(tmp_path, device="cpu")


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        LLM(tmp_path / "nowhere", device="cpu")
