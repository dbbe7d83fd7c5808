"""Bad input raises a ValueError naming the field, before anything is scheduled,
and the engine keeps serving the requests it already has."""

from __future__ import annotations

from typing import Any

import pytest

from engine import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("n", 0),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("logprobs", 50),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("min_tokens", 100),
    ],
)
def test_bad_sampling_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_bad_prompts_are_refused_while_others_keep_running(smollm2_llm: Any) -> None:
    engine = smollm2_llm.engine
    rid = engine.add_request(
        "Keep going:", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    engine.step()
    max_len = engine.scheduler_config.max_model_len
    with pytest.raises(ValueError, match="must not be empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([5] * max_len, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 2, 10**9], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("again", SamplingParams(), request_id=rid)
    with pytest.raises(ValueError, match="prompt token id"):
        smollm2_llm.generate([[1, 2], [-4]], SamplingParams())
    assert engine.num_unfinished_requests == 1
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == rid and len(outs[-1].outputs[0].token_ids) == 12
    assert engine.pool_is_whole()


def test_prompt_at_the_length_limit_gets_what_room_is_left(smollm2_llm: Any) -> None:
    max_len = smollm2_llm.engine.scheduler_config.max_model_len
    out = smollm2_llm.generate(
        [[42] * (max_len - 2)], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 2
    assert out[0].outputs[0].finish_reason == "length"


def test_unknown_engine_argument_is_a_type_error() -> None:
    from engine import LLM

    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM(device="cpu", blok_size=8)
