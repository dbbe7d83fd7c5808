"""The GPU workloads W4 (prefill) and W5 (capacity) of BENCHMARKS.md.

Same conventions as ``gpu_workloads``: ours first, then the peer; a failing peer is
recorded under ``peer_error``. W5 has no peer: it drops the resident HF model first,
so our engine plans its KV pool on an otherwise empty GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.common import random_prompts, stats
from bench.drivers import greedy, hf_generate, timed
from bench.gpu_env import GPUEnv
from bench.gpu_workloads import Result, error_result, small_pool


# --- W4 prefill ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W4Config:
    prompt_len: int = 4096
    reps: int = 3
    seed: int = 3


def _w4_ours(env: GPUEnv, cfg: W4Config, prompt: list[int], warm: list[int]) -> dict[str, Any]:
    llm = env.ours(max_num_batched_tokens=cfg.prompt_len, **small_pool(cfg.prompt_len + 64))
    llm.generate([warm], greedy(1))
    ttfts, engine_ttfts = [], []
    for _ in range(cfg.reps):
        llm.engine.reset_prefix_cache()
        wall, outs = timed(env.device, lambda: llm.generate([prompt], greedy(1)))
        ttfts.append(wall)
        engine_ttfts.append(outs[0].metrics.get("ttft_s"))
    return {"ttft_s": min(ttfts), "ttft_reps_s": ttfts, "engine_ttft_reps_s": engine_ttfts}


def run_w4(env: GPUEnv, cfg: W4Config) -> Result:
    """Time to first token of one long prompt (ours: one step, ``max_num_batched_tokens``
    = prompt length, ``max_tokens=1``; the prefix cache reset before each rep) beside
    HF's bare forward (``use_cache=False``, ``logits_to_keep=1``) and HF
    ``generate(max_new_tokens=1)``; best of ``reps`` each, after a warm-up prompt."""
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed)
    (warm,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed + 100)
    raw: dict[str, Any] = {"ours": _w4_ours(env, cfg, prompt, warm)}
    env.free()
    result: Result = {}
    try:
        peer = env.peer()
        ids = torch.tensor([prompt], device=env.device)

        def forward() -> None:
            with torch.inference_mode():
                peer(input_ids=ids, use_cache=False, logits_to_keep=1)

        forward()
        fwd = [timed(env.device, forward)[0] for _ in range(cfg.reps)]
        gen = [
            timed(env.device, lambda: hf_generate(peer, env.device, env.pad_token_id, [prompt], 1))[
                0
            ]
            for _ in range(cfg.reps)
        ]
        raw["peer"] = {"forward_s": min(fwd), "forward_reps_s": fwd, "ttft_s": min(gen),
                       "generate1_reps_s": gen}  # fmt: skip
    except Exception as e:
        result["peer_error"] = error_result(e)
    flops = env.shape.prefill_flops(cfg.prompt_len)
    rate = env.ceilings["matmul_flop_per_s"]
    raw |= {"prefill_flops": flops, "floor_s": flops / rate}
    ours_t = raw["ours"]["ttft_s"]
    ratios = {"ours_mfu": flops / ours_t / rate, "ours_ttft_over_floor": ours_t * rate / flops}
    if "peer" in raw:
        p = raw["peer"]
        ratios |= {
            "peer_forward_mfu": flops / p["forward_s"] / rate,
            "ttft_peer_over_ours": p["ttft_s"] / ours_t,
            "peer_forward_over_ours_ttft": p["forward_s"] / ours_t,
        }
    return {
        **result,
        "peer": "HF forward (use_cache=False, logits_to_keep=1) and generate(max_new_tokens=1)",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "ttft_s": "ours: LLM.generate(max_tokens=1) wall; peer: generate(max_new_tokens=1) wall; best of reps",
            "forward_s": "peer: one forward of the prompt, logits of the last position only",
            "prefill_flops": "2 x body params x tokens + 2 x LM head params (one row) + 2 x layers x heads x head_dim x tokens^2 (causal QK^T and PV)",
            "floor_s": "prefill_flops / measured matmul rate",
            "*_mfu": "prefill_flops / time / measured matmul rate (model FLOP utilisation vs the measured ceiling)",
            "*_over_ours*": "peer time / our time: above 1 means we are faster",
        },
    }


# --- W5 capacity ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W5Config:
    prompt_len: int = 2000
    output_len: int = 500
    oversubscribe: float = 1.25  # requests added = planned sessions x this
    max_num_seqs: int = 512  # must exceed the requests added, or it caps admission
    stall_steps: int = 20  # stop when the running count has not grown for this many steps
    max_s: float = 120.0
    num_blocks: int | None = None  # None: the engine's own plan (gpu_memory_utilization)
    max_model_len: int = 4096
    seed: int = 4


def _snapshot(llm: Any) -> dict[str, int]:
    """Blocks held by requests and the tokens whose K/V they store, now."""
    engine = llm.engine
    pool = engine.kv.pool
    running = engine.scheduler.running
    return {
        "running": len(running),
        "blocks_allocated": pool.num_blocks - pool.num_free_blocks,
        "tokens_stored": sum(r.num_computed_tokens for r in running),
    }


def run_w5(env: GPUEnv, cfg: W5Config) -> Result:
    """Sessions of prompt_len + output_len tokens the KV pool holds: planned =
    floor(num_blocks x block_size / session tokens); admitted = the most requests running
    at once when planned x oversubscribe are queued, stepping until the first preemption,
    all of them running, ``stall_steps`` steps without growth, or ``max_s``; the rest is
    aborted. Waste = (blocks allocated x block_size - tokens stored) / (blocks allocated
    x block_size) at the step with the most requests running."""
    env.drop_peer()
    extra = {} if cfg.num_blocks is None else {"num_blocks": cfg.num_blocks}
    # Eager: decode CUDA graphs (captured after the KV plan, so the plan is the same) would
    # only cost capture time and memory here.
    llm = env.ours(max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                   enforce_eager=True, **extra)  # fmt: skip
    engine, sched = llm.engine, llm.engine.scheduler
    plan = engine.runner.plan
    assert plan is not None
    session = cfg.prompt_len + cfg.output_len
    planned = plan.num_blocks * plan.block_size // session
    n = max(1, min(math.ceil(planned * cfg.oversubscribe), cfg.max_num_seqs))
    prompts = random_prompts(n, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed)
    env.log(f"W5: pool {plan.num_blocks} blocks x {plan.block_size}; planned {planned}; adding {n}")
    ids = [engine.add_request(p, greedy(cfg.output_len), f"w5-{i}") for i, p in enumerate(prompts)]
    peak = _snapshot(llm)
    series, step_s = [], []
    reason, last_growth, t0 = "finished", 0, time.perf_counter()
    preempt0 = sched.num_preemptions
    while engine.has_unfinished_requests():
        s0 = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - s0)
        snap = _snapshot(llm)
        series.append(snap["running"])
        if snap["running"] > peak["running"]:
            last_growth = len(series)
        if snap["running"] >= peak["running"]:
            peak = snap
        if sched.num_preemptions > preempt0:
            reason = "first preemption"
        elif snap["running"] == n:
            reason = "all running"
        elif len(series) - last_growth >= cfg.stall_steps:
            reason = f"running count flat for {cfg.stall_steps} steps"
        elif time.perf_counter() - t0 > cfg.max_s:
            reason = f"time limit {cfg.max_s} s"
        else:
            continue
        break
    wall = time.perf_counter() - t0
    for rid in ids:
        engine.abort(rid)
    env.log(f"W5: stopped after {len(series)} steps ({reason}); peak {peak}")
    held = peak["blocks_allocated"] * plan.block_size
    raw: dict[str, Any] = {
        "num_blocks": plan.num_blocks,
        "block_size": plan.block_size,
        "kv_bytes_per_token": plan.bytes_per_token,
        "kv_pool_bytes": plan.num_blocks * plan.block_size * plan.bytes_per_token,
        "planned_sessions": planned,
        "requests_added": n,
        "admitted_sessions": peak["running"],
        "peak": peak,
        "wasted_fraction": (held - peak["tokens_stored"]) / held if held else float("nan"),
        "sessions_stored_at_peak": peak["tokens_stored"] / session,
        "preemptions": sched.num_preemptions - preempt0,
        "steps": len(series),
        "stop_reason": reason,
        "wall_s": wall,
        "running_per_step": series,
        "step_s": stats(step_s),
    }
    del llm, engine, sched
    env.free()
    return {
        "peer": "none (capacity of our KV pool)",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": {
            "admitted_over_planned": peak["running"] / planned if planned else float("nan"),
            # The pool's capacity in practice: tokens held at once, in sessions, over the plan.
            "stored_over_planned": raw["sessions_stored_at_peak"] / planned
            if planned
            else float("nan"),
            "kv_wasted_over_allocated": raw["wasted_fraction"],
        },
        "notes": {
            "planned_sessions": "floor(num_blocks x block_size / (prompt_len + output_len))",
            "admitted_sessions": "most requests running at once before the stop; requests admitted early "
            "hold prompt + the tokens decoded so far, not yet a whole session",
            "sessions_stored_at_peak": "tokens stored at the peak / session length",
            "wasted_fraction": "(blocks allocated x block_size - tokens stored) / (blocks allocated x block_size)",
        },
    }
