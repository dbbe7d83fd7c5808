"""Tensor parallelism on two GPUs (NCCL, Triton kernels, CUDA graphs), float32 so that
the sum order of the all-reduce cannot flip a greedy token. Run on a lent 2-GPU
machine; skipped elsewhere."""

from __future__ import annotations

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


KILL_SCRIPT = """
import sys, threading, time
import ray, torch
from engine import LLM, SamplingParams
from tests.factories import random_prompts
from workers.group import WorkerGroupError

ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cuda", dtype="float32",
          max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3)
prompts = random_prompts(8, 5, 40, 512, seed=5)
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))
print("KILL", time.monotonic(), flush=True)
threading.Timer(1.0, lambda: ray.kill(llm.engine.executor._actors[0])).start()
try:
    for _ in range(200):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
except WorkerGroupError as e:
    print("RAISED", time.monotonic(), e, flush=True)
    llm.shutdown()
    with LLM(sys.argv[1], device="cuda", dtype="float32", max_model_len=128,
             gpu_memory_utilization=0.2) as again:
        again.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))
    print("REBUILT", flush=True)
"""


def test_killed_rank_fails_promptly_on_nccl(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A rank actor killed mid-generation under NCCL: the driving process either raises
    WorkerGroupError naming the rank (and can start a new engine), or, where aborting
    the communicator itself does not return, exits with the reason printed, within
    the abort deadline. Never a hang. Run in a subprocess, which may exit."""
    import os
    import subprocess
    import sys

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "KVSERVE_NCCL_ABORT_DEADLINE_S": "20",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, str(script), str(tiny_dirs["llama-hd16"])], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    kill_line = next(line for line in proc.stdout.splitlines() if line.startswith("KILL"))
    killed_at = float(kill_line.split()[1]) + 1.0
    assert "tensor-parallel rank 1 of 2 died" in out
    raised = [line for line in proc.stdout.splitlines() if line.startswith("RAISED")]
    if raised:
        assert float(raised[0].split()[1]) - killed_at < 15
        assert "REBUILT" in proc.stdout and proc.returncode == 0
    else:  # the abort hit its deadline: the process exited, loudly
        assert proc.returncode != 0 and "aborting NCCL" in out
