"""Where a batch-1 decode step's time goes (GPU): the CUDA-graph replay alone vs the
whole ``LLMEngine.step()`` (scheduler, input preparation, replay, sampling, stop
checks), against the step's floor (weights + KV read once at the measured copy rate).

``python -m bench.step_breakdown [--model llama3-8b-shape]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_env import gpu_ceilings
from bench.synthetic import Shape, write_model_dir
from engine import LLM, SamplingParams
from engine.shapes import make_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama3-8b-shape")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    cfg = make_config(args.model)
    model_dir = Path(tempfile.mkdtemp(prefix="kvserve-step-"))
    write_model_dir(cfg, model_dir)
    ceilings = gpu_ceilings(torch.device("cuda"), torch.bfloat16, 2 * 2**30, 8192)
    llm = LLM(
        model_dir,
        device="cuda",
        load_format="dummy",
        max_model_len=1024,
        num_blocks=64,
        max_num_seqs=4,
    )
    engine = llm.engine
    engine.add_request(
        list(range(100, 228)),
        SamplingParams(temperature=0, max_tokens=args.steps + 20, ignore_eos=True),
    )
    for _ in range(10):  # prefill + a few decode steps
        engine.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    graphs = engine.runner.graphs
    assert graphs is not None
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(args.steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_s = start.elapsed_time(end) / 1e3 / args.steps
    facts = Shape.from_config(cfg).facts(2)
    ctx = 128 + 10 + args.steps // 2  # mean context over the timed steps
    floor_s = (facts.weight_bytes + ctx * facts.kv_bytes_per_token) / ceilings["copy_bytes_per_s"]
    step_s = sorted(times)[len(times) // 2]
    print(json.dumps({
        "model": args.model, "device": torch.cuda.get_device_name(),
        "step_median_ms": step_s * 1e3, "graph_replay_ms": replay_s * 1e3, "floor_ms": floor_s * 1e3,
        "host_share_of_step": 1 - replay_s / step_s, "replay_over_floor": replay_s / floor_s,
        "step_over_floor": step_s / floor_s,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
