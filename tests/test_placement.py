"""The same tokens whatever the placement: batched, chunked, prefix-cached,
preempted, recomputed without a cache. The reference is the simplest path: one
request at a time, whole prompt in one step, no prefix cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import LLM, SamplingParams

PREFIX = (
    "You are a careful assistant. Answer briefly and precisely, and say when you do not know. "
    "Context: the kvserve engine keeps keys and values in paged blocks of sixteen tokens each. "
)
PROMPTS = [
    PREFIX + "Question: what is a block?",
    PREFIX + "Question: why share prefixes?",
    "Write a haiku about caches.",
    "1, 2, 3, 4, 5,",
    PREFIX + "Question: what happens when memory runs out?",
    "The quick brown fox",
]
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> list[list[int]]:
    llm = LLM(
        smollm2_dir,
        device="cpu",
        max_model_len=512,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
    )
    return [llm.generate([p], PARAMS)[0].outputs[0].token_ids for p in PROMPTS]


def tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_mixed_chunked_batch_matches_one_at_a_time(
    smollm2_dir: Path, reference: list[list[int]]
) -> None:
    # A 24-token budget splits every long prompt into chunks that share steps with decodes.
    llm = LLM(
        smollm2_dir,
        device="cpu",
        max_model_len=512,
        max_num_batched_tokens=24,
        enable_prefix_caching=False,
    )
    assert tokens(llm.generate(PROMPTS, PARAMS)) == reference
    assert llm.engine.pool_is_whole()


def test_prefix_cache_hits_are_real_and_change_nothing(
    smollm2_llm: Any, reference: list[list[int]]
) -> None:
    llm = smollm2_llm
    assert llm.engine.kv is not None
    llm.engine.kv.pool.reset_prefix_cache()
    first = llm.generate([PROMPTS[0]], PARAMS)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([PROMPTS[1]], PARAMS)[0]
    shared = len(llm.engine.tokenize(PREFIX)) // 16 * 16
    assert (
        second.num_cached_tokens >= shared - 16 > 0
    )  # the prefix's full blocks came from the cache
    assert second.num_cached_tokens % 16 == 0
    again = llm.generate(PROMPTS, PARAMS)
    hits = [o.num_cached_tokens for o in again]
    assert all(h > 0 for h, p in zip(hits, PROMPTS, strict=True) if p.startswith(PREFIX)), hits
    assert tokens([first, second]) == reference[:2]
    assert tokens(again) == reference
    assert llm.engine.pool_is_whole()


def test_preemption_with_a_tiny_pool(smollm2_dir: Path, reference: list[list[int]]) -> None:
    # 12 blocks of 16 tokens: the six requests need ~30 blocks together.
    llm = LLM(smollm2_dir, device="cpu", max_model_len=192, num_blocks=12, kv_admission="committed")
    outs = llm.generate(PROMPTS, PARAMS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert all(o.finished for o in outs)
    assert tokens(outs) == reference
    assert llm.engine.pool_is_whole()


def test_no_cache_mode_gives_the_same_tokens(smollm2_dir: Path, reference: list[list[int]]) -> None:
    llm = LLM(smollm2_dir, device="cpu", max_model_len=512, kv_cache=False)
    assert llm.engine.kv is None
    assert tokens(llm.generate(PROMPTS[:3], PARAMS)) == reference[:3]


def test_n_samples_share_the_prompt_blocks(smollm2_llm: Any) -> None:
    engine = smollm2_llm.engine
    rid = engine.add_request(PROMPTS[0], SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=8))
    engine.step()
    assert engine.kv is not None
    tables = [engine.kv.block_table(f"{rid}#{i}") for i in range(3)]
    full = len(engine.tokenize(PROMPTS[0])) // 16
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    shared = tables[0][0]
    assert engine.kv.pool.ref_cnt[shared] == 3
    while engine.has_unfinished_requests():
        outs = engine.step()
    (out,) = outs
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # distinct samples
    assert engine.pool_is_whole()


def test_abort_at_any_point_returns_every_block(smollm2_dir: Path) -> None:
    llm = LLM(smollm2_dir, device="cpu", max_model_len=512, max_num_batched_tokens=16)
    engine = llm.engine
    long_rid = engine.add_request(PROMPTS[0], PARAMS)  # prefill spans several steps
    short_rid = engine.add_request(PROMPTS[3], PARAMS)
    engine.step()
    waiting_rid = engine.add_request(PROMPTS[2], PARAMS)
    aborted = engine.abort(long_rid)  # mid-prefill
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    engine.abort(waiting_rid)  # never scheduled
    for _ in range(5):
        engine.step()
    engine.abort(short_rid)  # mid-decode
    assert not engine.has_unfinished_requests()
    assert engine.pool_is_whole()
