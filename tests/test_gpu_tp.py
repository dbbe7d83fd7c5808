"""Tensor parallelism on two GPUs (NCCL, Triton kernels, CUDA graphs), float32 so that
the sum order of the all-reduce cannot flip a greedy token. Run on a lent 2-GPU
machine; skipped elsewhere."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from tests.factories import random_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3)
KW: dict[str, Any] = dict(device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8,
                          gpu_memory_utilization=0.3)  # fmt: skip


def run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[Any]]:
    outs = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


@pytest.mark.parametrize(
    ("name", "eager"),
    [("llama-hd16", True), ("llama-hd16", False), ("mistral-hd16", False), ("llama3", False)],
)
def test_tp2_matches_tp1_on_gpu(
    ray_cluster: Any, tiny_dirs: dict[str, Path], name: str, eager: bool
) -> None:
    """head_dim 16 models run the Triton kernels (and CUDA graphs unless eager): 2 KV
    heads split, 1 KV head (MQA) replicated; llama3 (head_dim 8) the torch backend."""
    prompts = random_prompts(6, 5, 60, 512, seed=7)
    kw = {**KW, "enforce_eager": eager}
    one = LLM(tiny_dirs[name], **kw)
    ref_tokens, ref_lps = run(one, prompts)
    del one
    with LLM(tiny_dirs[name], tensor_parallel_size=2, **kw) as two:
        uses_graphs = two.engine.runner.uses_triton and not eager
        assert (two.engine.runner.graphs is not None) == uses_graphs
        tokens, lps = run(two, prompts)
        assert tokens == ref_tokens
        for a, b in zip(lps, ref_lps, strict=True):
            for sa, sb in zip(a, b, strict=True):
                assert sa.keys() == sb.keys()
                assert max(abs(sa[t] - sb[t]) for t in sa) < 1e-3
        assert two.engine.pool_is_whole()


def test_killed_rank_fails_promptly_on_nccl(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    import ray

    from workers.group import WorkerGroupError

    llm = LLM(tiny_dirs["llama-hd16"], tensor_parallel_size=2, **{**KW, "max_model_len": 512})
    prompts = random_prompts(8, 5, 40, 512, seed=5)
    llm.generate(prompts[:2], GREEDY)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        ray.kill(llm.engine.executor._actors[0])  # type: ignore[attr-defined]

    threading.Timer(1.0, kill).start()
    with pytest.raises(WorkerGroupError, match="rank 1 of 2"):
        for _ in range(200):  # long enough that the kill lands mid-generation
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    assert time.monotonic() - killed_at[0] < 15
    llm.shutdown()
