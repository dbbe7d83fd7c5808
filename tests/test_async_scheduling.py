"""Async scheduling (step N+1 scheduled while step N runs, greedy tokens kept on the
device) gives exactly the outputs of the synchronous loop: tokens, text, finish
reasons, logprobs; stops, aborts and preemption included; every block comes back.

On the CPU it is forced on (``async_scheduling=True``): the logic is the same as on
CUDA, only nothing overlaps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLMEngine, SamplingParams
from engine.config import EngineArgs
from tests.factories import random_prompts

Run = dict[str, tuple[list[int], str, str | None, Any]]


def engine(model: Path | str | None, on: bool, **kw: Any) -> LLMEngine:
    return LLMEngine(EngineArgs(model=model, device="cpu", async_scheduling=on, **kw))


def drain(eng: LLMEngine, abort_at: dict[str, int] | None = None) -> Run:
    """Steps until done; aborts ``abort_at``'s requests once they have that many tokens.
    Checks that cumulative outputs only grow and each request finishes once."""
    abort_at = dict(abort_at or {})
    last: Run = {}
    finished: set[str] = set()
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id not in finished
            for c in out.outputs:
                key = f"{out.request_id}/{c.index}"
                before = last.get(key, ([], "", None, None))[0]
                assert c.token_ids[: len(before)] == before
                last[key] = (list(c.token_ids), c.text, c.finish_reason, c.logprobs)
            if out.finished:
                finished.add(out.request_id)
            n = len(out.outputs[0].token_ids)
            if out.request_id in abort_at and n >= abort_at[out.request_id] and not out.finished:
                del abort_at[out.request_id]
                done = eng.abort(out.request_id)
                assert done is not None and done.finished
                for c in done.outputs:
                    last[f"{out.request_id}/{c.index}"] = (
                        list(c.token_ids), c.text, c.finish_reason, c.logprobs,
                    )  # fmt: skip
                finished.add(out.request_id)
    assert eng.pool_is_whole()
    return last


def submit(eng: LLMEngine, requests: list[tuple[Any, SamplingParams]]) -> None:
    for i, (prompt, sp) in enumerate(requests):
        eng.add_request(prompt, sp, request_id=f"r{i}")


def test_smollm2_mix_is_identical_with_async_scheduling(smollm2_dir: Path) -> None:
    """EOS stops, stop strings, max_tokens, min_tokens, logprobs, a seeded sampled
    request and n=2 in one batch: the same outputs with async scheduling on and off."""
    g = SamplingParams(temperature=0, max_tokens=40)
    requests: list[tuple[Any, SamplingParams]] = [
        ("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", g),
        ("The capital of France is", SamplingParams(temperature=0, max_tokens=30, stop=["."])),
        ("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=7)),
        ("Once upon a time", SamplingParams(temperature=0, max_tokens=12, min_tokens=10)),
        ("List three colors:", SamplingParams(temperature=0, max_tokens=9, logprobs=2)),
        ("Tell me a joke.", SamplingParams(temperature=0.8, seed=7, max_tokens=10)),
        ("Count: 1, 2, 3,", SamplingParams(n=2, temperature=0, max_tokens=8)),
    ]
    runs = []
    for on in (False, True):
        eng = engine(None, on, max_model_len=512)
        submit(eng, requests)
        runs.append(drain(eng))
    assert runs[0] == runs[1]
    assert runs[0]["r0/0"][2] == "stop" and runs[0]["r1/0"][2] == "stop"


def test_aborts_and_stop_tokens_mid_flight_leave_the_pool_whole(
    tiny_dirs: dict[str, Path],
) -> None:
    """Requests stopped by a token the running step sampled, and requests aborted while
    a step is in flight, end as in the synchronous loop; no block is lost."""
    prompts = random_prompts(6, 5, 40, 256, seed=3)
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = engine(tiny_dirs["llama3"], False)
    submit(base, [(p, plain) for p in prompts])
    ref = drain(base)
    # Stop each request at the token it produced 5th (or its last).
    stops = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=(ref[f"r{i}/0"][0][4],)) for i in range(6)]  # fmt: skip
    runs = []
    for on in (False, True):
        eng = engine(tiny_dirs["llama3"], on)
        submit(eng, list(zip(prompts, stops, strict=True)))
        runs.append(drain(eng, abort_at={"r1": 2, "r4": 3}))
    assert runs[0] == runs[1]
    assert runs[1]["r1/0"][2] == "abort" and runs[1]["r0/0"][2] == "stop"


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(24, 48),
    chunk=st.sampled_from([16, 32, 64]),
    host=st.sampled_from([0, 64 * 1024]),
)
def test_preemption_and_chunking_give_the_same_tokens(
    tiny_dirs: dict[str, Path], seed: int, num_blocks: int, chunk: int, host: int
) -> None:
    """A pool small enough to preempt (admission on committed blocks), a token budget
    that chunks prompts, with or without a host tier: the async loop gives the
    synchronous loop's tokens."""
    prompts = random_prompts(8, 4, 60, 256, seed=seed)
    prompts += [
        p[:40] + q
        for p, q in zip(prompts[:4], random_prompts(4, 4, 20, 256, seed + 1), strict=True)
    ]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = {"num_blocks": num_blocks, "block_size": 4, "max_model_len": 96,
          "max_num_batched_tokens": chunk, "max_num_seqs": 8, "kv_admission": "committed",
          "host_kv_cache_bytes": host}  # fmt: skip
    runs = []
    for on in (False, True):
        eng = engine(tiny_dirs["llama3"], on, **kw)
        submit(eng, [(p, params) for p in prompts])
        runs.append(drain(eng))
    assert runs[0] == runs[1]
