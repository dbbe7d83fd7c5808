"""W5-paging: what paged blocks buy over a contiguous reservation per session, on a
realistic length mix (the seeds' PagedAttention claim: 38 → 52 sessions, +37 %).

The same KV memory (one engine's pool) either reserves ``max_model_len`` tokens per
session up front (the pre-paging way: ``num_blocks × block_size // max_model_len``
sessions) or allocates 16-token blocks as each session grows (ours). Sessions of
ShareGPT first-turn lengths (``bench.sharegpt``: prompt and answer length pairs that fit
``max_model_len``) are taken in order: paged, the pool holds as many whole sessions as
their blocks fit (``paged_sessions``, each at its own final length). The engine run
checks the block arithmetic (random prompt ids, answers forced to their length, all
queued at once, stepped until the first preemption or the running count stops
growing): ``peak_running`` is the most sessions it ran at once. With admission on
projected KV (the default) that is the sessions whose whole length fits, as
``paged_sessions`` counts them; with ``kv_admission="committed"`` it is more, because
only prompts are counted and the sessions grow into the pool later, to be preempted.
Waste: (blocks allocated × block size − tokens stored) / that, at the peak.

``python -m bench.paging [--device cpu] [--num-blocks 1280] [--max-model-len 2048]``
writes the record ``W5-paging`` (``bench/results``) and regenerates the report; the GPU
suite runs ``run_paging`` on its own engine.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from bench import report, sharegpt
from bench.common import RESULTS_DIR, environment, write_result
from engine import LLM, SamplingParams

SEEDS_CLAIM = {"contiguous_sessions": 38, "paged_sessions": 52, "ratio": 52 / 38}


def run_paging(
    llm: LLM, num_requests: int, seed: int = 0, max_steps: int = 100_000, stall_steps: int = 20
) -> dict[str, Any]:
    """Queues ``num_requests`` ShareGPT-length sessions on ``llm``'s engine (the length
    mix repeated when it has fewer) and steps it until the first preemption, the queue
    drained, or ``stall_steps`` steps without more running; then aborts what is left.
    The figures of the module doc."""
    engine = llm.engine
    sched, plan = engine.scheduler, engine.runner.plan
    assert plan is not None and engine.kv is not None
    max_len = engine.scheduler_config.max_model_len
    mix = [(p, o) for p, o in sharegpt.load()["pairs"] if p + o <= max_len]
    pairs = (mix * -(-num_requests // len(mix)))[:num_requests]
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    ids = []
    for i, (p, o) in enumerate(pairs):
        prompt = rng.integers(10, vocab - 10, size=p).tolist()
        sp = SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)
        ids.append(engine.add_request(prompt, sp, f"paging-{i}"))
    pool = engine.kv.pool
    contiguous = plan.num_blocks * plan.block_size // max_len
    peak: dict[str, Any] = {"running": 0}
    preempt0, steps, reason, t0 = sched.num_preemptions, 0, "queue drained", time.perf_counter()
    grew_at = 0
    while engine.has_unfinished_requests() and steps < max_steps:
        engine.step()
        steps += 1
        running = sched.running
        if sched.num_preemptions > preempt0:
            reason = "first preemption"
            break
        if len(running) > peak["running"]:
            grew_at = steps
        elif steps - grew_at >= stall_steps:
            reason = f"running count flat for {stall_steps} steps"
            break
        if len(running) >= peak["running"]:
            allocated = pool.num_blocks - pool.num_free_blocks
            peak = {"running": len(running), "blocks_allocated": allocated,
                    "tokens_stored": sum(r.num_computed_tokens for r in running),
                    "step": steps}  # fmt: skip
        if not sched.waiting:
            reason = "queue drained"
            break
    for rid in ids:
        engine.abort(rid)
    fit, used = 0, 0
    for p, o in pairs:  # whole sessions, in order, each in the blocks of its final length
        used += -(-(p + o) // plan.block_size)
        if used > plan.num_blocks:
            break
        fit += 1
    slots = peak.get("blocks_allocated", 0) * plan.block_size
    return {
        "num_blocks": plan.num_blocks, "block_size": plan.block_size, "max_model_len": max_len,
        "pool_tokens": plan.num_blocks * plan.block_size,
        "contiguous_sessions": contiguous, "paged_sessions": fit,
        "paged_over_contiguous": fit / contiguous if contiguous else float("inf"),
        "peak_running": peak["running"],
        "stopped": reason, "steps": steps, "seconds": time.perf_counter() - t0, "peak": peak,
        "waste_at_peak": (slots - peak.get("tokens_stored", 0)) / slots if slots else 0.0,
        "sessions_queued": len(pairs),
        "mean_prompt_len": float(np.mean([p for p, _ in pairs])),
        "mean_output_len": float(np.mean([o for _, o in pairs])),
    }  # fmt: skip


def result_of(raw: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``write_result`` body for ``raw`` (``run_paging``'s figures)."""
    return {
        "peer": "the same pool reserved contiguously at max_model_len per session (arithmetic); "
        "the seeds' claim quoted beside",
        "config": {
            "model": model,
            "num_blocks": raw["num_blocks"],
            "max_model_len": raw["max_model_len"],
            "sessions_queued": raw["sessions_queued"],
        },
        "raw": {**raw, "seeds_claim": SEEDS_CLAIM},
        "ratios": {
            "paged_over_contiguous": raw["paged_over_contiguous"],
            "seeds_paged_over_contiguous": SEEDS_CLAIM["ratio"],
            "waste_at_peak": raw["waste_at_peak"],
        },
        "notes": {
            "contiguous_sessions": "num_blocks x block_size // max_model_len",
            "paged_sessions": "whole sessions (final lengths, in order) whose blocks fit the pool",
            "peak_running": "most sessions the engine ran at once (projected admission)",
            "waste_at_peak": "(blocks allocated x block size - tokens stored) / that",
            "lengths": "ShareGPT V3 first turns (bench/data/sharegpt_w9.json, SmolLM2's "
            "tokenizer) that fit max_model_len, repeated in order when more are queued",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paging", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="HF directory (default: SmolLM2)")
    p.add_argument("--num-blocks", type=int, default=1280)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-requests", type=int, default=200)
    args = p.parse_args(argv)
    llm = LLM(args.model, device=args.device, num_blocks=args.num_blocks,
              max_model_len=args.max_model_len, max_num_seqs=args.num_requests,
              max_num_batched_tokens=4096, enforce_eager=True)  # fmt: skip
    raw = run_paging(llm, args.num_requests)
    device = torch.device(args.device)
    model = args.model or "SmolLM2-135M-Instruct"
    path = write_result(RESULTS_DIR, "cpu" if device.type == "cpu" else "gpu", "W5-paging",
                        environment(device), {}, result_of(raw, model))  # fmt: skip
    report.write_report(RESULTS_DIR, report.DOCS_PATH)
    print({k: raw[k] for k in ("contiguous_sessions", "paged_sessions", "paged_over_contiguous",
                               "peak_running", "waste_at_peak", "stopped", "steps", "seconds")})  # fmt: skip
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
