"""Tensor parallelism on a real Ray cluster with gloo: every TP size gives TP=1's
tokens; a rank that dies fails the group loudly and promptly; groups rebuild."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from engine import LLM, SamplingParams
from tests.factories import random_prompts
from workers.group import WorkerGroupError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)


def tokens_and_logprobs(llm: LLM, prompts: list[Any], params: SamplingParams = GREEDY) -> Any:
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def assert_logprobs_close(a: Any, b: Any, tol: float = 1e-4) -> None:
    for seq_a, seq_b in zip(a, b, strict=True):
        for step_a, step_b in zip(seq_a, seq_b, strict=True):
            assert step_a.keys() == step_b.keys()
            for tok in step_a:
                assert abs(step_a[tok] - step_b[tok]) < tol


@pytest.fixture(scope="module")
def llama3_ref(tiny_dirs: dict[str, Path]) -> Any:
    prompts = random_prompts(6, 5, 60, 512, seed=7)
    return prompts, tokens_and_logprobs(LLM(tiny_dirs["llama3"], device="cpu"), prompts)


@pytest.mark.parametrize(("tp", "dispatch"), [(2, "calls"), (4, "calls"), (2, "compiled")])
def test_tp_matches_tp1_tiny_llama(
    ray_cluster: Any,
    tiny_dirs: dict[str, Path],
    llama3_ref: Any,
    tp: int,
    dispatch: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tiny Llama, 8 query and 4 KV heads: TP=2 (2 KV heads a rank), TP=4 (1 a rank);
    steps reach the actors as calls or through a Ray Compiled Graph."""
    monkeypatch.setenv("KVSERVE_TP_DISPATCH", dispatch)
    prompts, (ref_tokens, ref_lps) = llama3_ref
    with LLM(tiny_dirs["llama3"], device="cpu", tensor_parallel_size=tp) as llm:
        tokens, lps = tokens_and_logprobs(llm, prompts)
        assert tokens == ref_tokens
        assert_logprobs_close(lps, ref_lps)
        layer = llm.engine.runner.model.attention_layers()[0]
        assert layer.num_kv_heads == 4 // tp
        pids = llm.engine.executor.ping()  # type: ignore[attr-defined]
        assert len(pids) == tp - 1 and all(pid > 0 for pid in pids)
        assert llm.engine.executor.dispatch == dispatch  # type: ignore[attr-defined]
        assert llm.engine.pool_is_whole()


def test_tp_per_rank_cache_is_a_share(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    """Same block ids, same block count; each rank's cache is 1/tp of TP=1's bytes."""
    one = LLM(tiny_dirs["llama3"], device="cpu", num_blocks=64)
    with LLM(tiny_dirs["llama3"], device="cpu", num_blocks=64, tensor_parallel_size=2) as two:
        assert two.engine.executor.num_blocks == one.engine.executor.num_blocks == 64
        size = sum(c.numel() * c.element_size() for c in one.engine.runner.kv_caches)
        half = sum(c.numel() * c.element_size() for c in two.engine.runner.kv_caches)
        assert half * 2 == size


def test_tp_with_chunks_prefix_cache_and_preemption(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    """Scheduling decisions are the driver's alone: a tight budget and pool at TP=2
    chunk, hit the prefix cache and preempt, and still give the reference tokens."""
    shared = list(range(10, 58))
    prompts = [shared + p for p in random_prompts(6, 4, 30, 512, seed=3)]
    tight = dict(
        device="cpu",
        max_num_batched_tokens=24,
        num_blocks=14,
        max_model_len=128,
        kv_admission="committed",
    )
    ref, _ = tokens_and_logprobs(LLM(tiny_dirs["llama3"], device="cpu"), prompts)
    with LLM(tiny_dirs["llama3"], tensor_parallel_size=2, **tight) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert any(o.num_cached_tokens > 0 for o in outs)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.pool_is_whole()


def test_tp_larger_than_kv_heads_replicates(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    """One KV head (MQA) at TP=2: each rank holds a copy of the head its queries need."""
    prompts = random_prompts(4, 5, 40, 512, seed=11)
    ref = tokens_and_logprobs(LLM(tiny_dirs["llama-mqa"], device="cpu"), prompts)
    with LLM(tiny_dirs["llama-mqa"], device="cpu", tensor_parallel_size=2) as llm:
        tokens, lps = tokens_and_logprobs(llm, prompts)
        assert tokens == ref[0]
        assert_logprobs_close(lps, ref[1])
        assert llm.engine.runner.model.attention_layers()[0].num_kv_heads == 1


@pytest.mark.slow
def test_tp3_smollm2_matches_tp1(ray_cluster: Any, smollm2_dir: Path, smollm2_llm: LLM) -> None:
    """SmolLM2 (9 query heads, 3 KV heads) split over three ranks."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, params)]
    with LLM(smollm2_dir, device="cpu", max_model_len=1024, tensor_parallel_size=3) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref


def test_tp_size_that_does_not_divide_is_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide 8 attention"):
        LLM(tiny_dirs["llama3"], device="cpu", tensor_parallel_size=3)


def _group_resources_free(want_cpus: float) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= want_cpus:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("dispatch", ["calls", "compiled"])
def test_killed_rank_fails_promptly_and_group_rebuilds(
    ray_cluster: Any, tiny_dirs: dict[str, Path], dispatch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSERVE_TP_DISPATCH", dispatch)
    total = ray.cluster_resources()["CPU"]
    prompts = random_prompts(8, 5, 40, 512, seed=5)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    llm = LLM(tiny_dirs["llama3"], device="cpu", tensor_parallel_size=2, max_model_len=512)
    llm.generate(prompts[:2], GREEDY)
    # Killed while a generation is under way (the driver waits in collectives).
    actor = llm.engine.executor._actors[0]  # type: ignore[attr-defined]
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        ray.kill(actor)

    timer = threading.Timer(1.0, kill)
    timer.start()
    with pytest.raises(WorkerGroupError, match="rank 1 of 2 died"):
        llm.generate(prompts, long)
    assert killed_at and time.monotonic() - killed_at[0] < 10
    # The failure sticks: the next call refuses at once instead of hanging.
    t0 = time.monotonic()
    with pytest.raises(WorkerGroupError):
        llm.generate(prompts[:1], GREEDY)
    assert time.monotonic() - t0 < 1
    llm.shutdown()
    assert _group_resources_free(total)  # placement group and actors are gone
    with LLM(tiny_dirs["llama3"], device="cpu", tensor_parallel_size=2) as again:
        assert len(again.generate(prompts[:2], GREEDY)) == 2


def test_rank_killed_between_steps_fails_the_next_step(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    with LLM(tiny_dirs["llama3"], device="cpu", tensor_parallel_size=2) as llm:
        llm.generate([[1, 2, 3]], GREEDY)
        ray.kill(llm.engine.executor._actors[0])  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError, match="rank 1 of 2"):
            llm.generate([[4, 5, 6]], GREEDY)
        assert time.monotonic() - t0 < 10


DROPPED_ENGINES = """
import sys, time
from engine import LLM, SamplingParams
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
for _ in range(2):  # two TP=2 engines in a row, each dropped without shutdown()
    llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
    print("tokens", llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids, flush=True)
    del llm
held = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
t0 = time.monotonic()
try:
    LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
except RuntimeError as e:
    print("refused", round(time.monotonic() - t0, 1), e, flush=True)
"""


def test_dropped_tp_engines_release_their_groups(tiny_dirs: dict[str, Path]) -> None:
    """On a 2-CPU Ray: a dropped TP=2 engine (no ``shutdown()``) gives its placement group
    back, so the next one places; one still referenced makes the next fail at once with
    a message naming it, not after the 60 s placement wait."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DROPPED_ENGINES, str(tiny_dirs["llama3"])],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = done.stdout.splitlines()
    tokens = [line for line in lines if line.startswith("tokens")]
    assert len(tokens) == 2 and tokens[0] == tokens[1], done.stdout + done.stderr[-3000:]
    refused = [line for line in lines if line.startswith("refused")]
    assert refused, done.stdout + done.stderr[-3000:]
    assert float(refused[0].split()[1]) < 30
    assert "still hold theirs (kvserve-rank-" in refused[0]
    assert "LLM.shutdown()" in refused[0]
