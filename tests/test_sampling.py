"""Sampling against hand-computed expectations, seeds, stops, logprobs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine import SamplingParams
from engine.request import Request
from engine.sampler import Sampler, _warped_probs


def req(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    rid: str = "r",
) -> Request:
    r = Request(rid, prompt or [0], params, max_tokens=100)
    for t in output or []:
        r.append_output_token(t)
    return r


def test_logprobs_are_the_raw_log_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    res = Sampler().sample(logits, [req(SamplingParams(temperature=0, logprobs=2))], eos_ids=())
    z = math.log(sum(math.exp(x) for x in (2.0, 1.0, 0.0, -1.0)))
    assert res.token_ids == [0]
    top = res.top_logprobs[0]
    assert top is not None and set(top) == {0, 1}
    assert top[0] == pytest.approx(2.0 - z, abs=1e-6)
    assert top[1] == pytest.approx(1.0 - z, abs=1e-6)
    assert res.sampled_logprobs == [pytest.approx(2.0 - z, abs=1e-6)]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    # Token 0 (seen, 2.0 -> 0.5) loses to token 1 (unseen, 1.0); token 3 (seen, -1 -> -4).
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = req(SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=0), prompt=[0, 3])
    res = Sampler().sample(logits, [r], eos_ids=())
    assert res.token_ids == [1]
    # Logprobs stay those of the raw distribution.
    assert res.sampled_logprobs is not None
    z = math.log(sum(math.exp(x) for x in (2.0, 1.0, 0.0, -1.0)))
    assert res.sampled_logprobs[0] == pytest.approx(1.0 - z, abs=1e-6)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0]])
    # Token 0 twice in the output: 3 - 2*0.5 - 0.6 = 1.4; token 1 once: 2.5 - 0.5 - 0.6 = 1.4 - 0.0
    # Token 2 only in the prompt: untouched 2.0 -> wins.
    r = req(
        SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.6),
        prompt=[2],
        output=[0, 0, 1],
    )
    assert Sampler().sample(logits, [r], eos_ids=()).token_ids == [2]


def test_min_tokens_bans_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    r = req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(1,)), output=[2])
    assert Sampler().sample(logits, [r], eos_ids=(0,)).token_ids == [2]


def test_top_k_top_p_min_p_filters() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = _warped_probs(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p=0.8: 0.5 + 0.3 reaches 0.8, so 0.15 and 0.05 are dropped.
    p = _warped_probs(logits, SamplingParams(top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # min_p=0.25: tokens below 0.25 * 0.5 = 0.125 are dropped (only 0.05).
    p = _warped_probs(logits, SamplingParams(min_p=0.25))
    assert p[3] == 0 and p[2] > 0
    # temperature 0.5 squares the odds: 0.5^2 : 0.3^2 ...
    p = _warped_probs(logits, SamplingParams(temperature=0.5))
    expect = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    torch.testing.assert_close(p, expect / expect.sum())


def test_seeded_sampling_is_reproducible_and_batch_independent(smollm2_llm: Any) -> None:
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = smollm2_llm.generate(["Tell me a story"], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, seed=99, max_tokens=20)
    batched = (
        smollm2_llm.generate(["Tell me a story", "Something else"], [sp, other])[0]
        .outputs[0]
        .token_ids
    )
    assert alone == batched
    different = smollm2_llm.generate(
        ["Tell me a story"],
        SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=16, ignore_eos=True),
    )
    assert different[0].outputs[0].token_ids != alone


def test_n_seeded_samples_are_reproducible(smollm2_llm: Any) -> None:
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    a = [o.token_ids for o in smollm2_llm.generate(["Hello"], sp)[0].outputs]
    b = [o.token_ids for o in smollm2_llm.generate(["Hello"], sp)[0].outputs]
    assert a == b and len(set(map(tuple, a))) > 1


def test_stop_string_cuts_the_text_before_it(smollm2_llm: Any) -> None:
    prompt = "Count: 1, 2, 3, 4,"
    full = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0].outputs[0]
    text = full.text
    stop = text[8:11]
    assert stop.strip() and text.find(stop) == 8
    out = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop, "never-seen"])
    )[0].outputs[0]
    assert out.text == text[:8]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_stop_token_id_ends_the_request_and_is_kept(smollm2_llm: Any) -> None:
    prompt = "The alphabet: a, b, c,"
    full = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    )[0].outputs[0]
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id])
    )[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_max_tokens_gives_length(smollm2_llm: Any) -> None:
    out = smollm2_llm.generate(
        ["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_greedy_logprobs_match_transformers(smollm2_llm: Any, smollm2_hf: Any) -> None:
    prompt = "Paged attention stores"
    out = smollm2_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    )[0]
    sample = out.outputs[0]
    ids = out.prompt_token_ids + sample.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(smollm2_hf(torch.tensor([ids])).logits[0].float(), -1)
    assert sample.logprobs is not None and len(sample.logprobs) == 6
    for step, (tok, lp) in enumerate(zip(sample.token_ids, sample.logprobs, strict=True)):
        row = ref[len(out.prompt_token_ids) - 1 + step]
        top3 = row.topk(3).indices.tolist()
        assert set(lp) == set(top3) | {tok}
        for t, v in lp.items():
            assert v == pytest.approx(row[t].item(), abs=2e-3)
    assert sample.cumulative_logprob == pytest.approx(
        sum(lp[t] for t, lp in zip(sample.token_ids, sample.logprobs, strict=True))
    )
