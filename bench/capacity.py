"""W5 capacity: sessions of ``prompt_len + output_len`` tokens the KV pool holds, as
planned (by formula) and as admitted in practice, with the preemption count.

planned = floor(num_blocks × block_size / session tokens) (``kvserve plan``'s figure).
``planned × oversubscribe`` sessions are queued at once and the engine runs them to
the end (or ``max_s``). Admission is on projected KV by default (``engine.kv_budget``:
a session is admitted only when its prompt and its whole decode fit beside every
admitted session's), so the pool fills to the plan and nothing is preempted; the
record's ``admitted_sessions`` is the most sessions running at once, ``preemptions``
the count over the whole run, ``demand_at_peak`` the share of the pool held or
projected at that moment, ``most_stored`` the most tokens held at once (as a share
of the pool: how full the admitted sessions made it as they grew). Waste = (blocks
allocated × block size − tokens stored) / that, at the peak.

``python -m bench.capacity [--device cpu]`` writes the records ``W5`` (this) and
``W5-paging`` (``bench.paging``) on CPU with SmolLM2; the GPU suite runs ``run_w5`` and
``run_paging`` on its own engine (``bench.gpu --workloads W5,W5-paging``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import paging, report
from bench.common import RESULTS_DIR, environment, random_prompts, stats, write_result
from bench.drivers import greedy
from engine import LLM


@dataclass(frozen=True, slots=True)
class W5Config:
    prompt_len: int = 2000
    output_len: int = 500
    oversubscribe: float = 1.25  # requests added = planned sessions x this
    max_num_seqs: int = 512  # must exceed the requests added, or it caps admission
    max_s: float = 240.0  # stop (and abort the rest) after this long
    num_blocks: int | None = None  # None: the engine's own plan (gpu_memory_utilization)
    max_model_len: int = 4096
    kv_admission: str = "projected"
    seed: int = 4


def run_w5(llm: LLM, cfg: W5Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures of the module doc, as a result body (``write_result``)."""
    engine, sched = llm.engine, llm.engine.scheduler
    plan = engine.runner.plan
    assert plan is not None and engine.kv is not None
    pool = engine.kv.pool
    session = cfg.prompt_len + cfg.output_len
    planned = plan.num_blocks * plan.block_size // session
    n = max(1, min(math.ceil(planned * cfg.oversubscribe), cfg.max_num_seqs))
    prompts = random_prompts(n, cfg.prompt_len, cfg.prompt_len, engine.model_config.vocab_size,
                             cfg.seed)  # fmt: skip
    log(f"W5: pool {plan.num_blocks} blocks x {plan.block_size}; planned {planned}; adding {n}")
    ids = [engine.add_request(p, greedy(cfg.output_len), f"w5-{i}") for i, p in enumerate(prompts)]
    peak: dict[str, Any] = {"running": 0}
    most_stored = 0
    series, step_s, finished = [], [], 0
    preempt0, t0, reason = sched.num_preemptions, time.perf_counter(), "finished"
    while engine.has_unfinished_requests():
        if time.perf_counter() - t0 > cfg.max_s:
            reason = f"time limit {cfg.max_s} s"
            break
        s0 = time.perf_counter()
        outs = engine.step()
        step_s.append(time.perf_counter() - s0)
        finished += sum(o.finished for o in outs)
        running = sched.running
        series.append(len(running))
        held = pool.num_blocks - pool.num_free_blocks
        snap = {"running": len(running), "blocks_allocated": held,
                "tokens_stored": sum(r.num_computed_tokens for r in running),
                "demand_blocks": held + sched.projected_blocks(), "step": len(series)}  # fmt: skip
        if snap["running"] > peak["running"]:
            peak = snap
        most_stored = max(most_stored, snap["tokens_stored"])
    wall = time.perf_counter() - t0
    for rid in ids:
        engine.abort(rid)
    log(f"W5: {len(series)} steps ({reason}); peak {peak}; preemptions "
        f"{sched.num_preemptions - preempt0}")  # fmt: skip
    slots = peak.get("blocks_allocated", 0) * plan.block_size
    pool_tokens = plan.num_blocks * plan.block_size
    raw: dict[str, Any] = {
        "num_blocks": plan.num_blocks,
        "block_size": plan.block_size,
        "kv_bytes_per_token": plan.bytes_per_token,
        "kv_pool_bytes": pool_tokens * plan.bytes_per_token,
        "planned_sessions": planned,
        "requests_added": n,
        "requests_finished": finished,
        "admitted_sessions": peak["running"],
        "peak": peak,
        "demand_at_peak": peak.get("demand_blocks", 0) / plan.num_blocks,
        "most_stored": most_stored / pool_tokens,
        "wasted_fraction": (slots - peak.get("tokens_stored", 0)) / slots if slots else 0.0,
        "preemptions": sched.num_preemptions - preempt0,
        "steps": len(series),
        "stop_reason": reason,
        "wall_s": wall,
        "running_per_step": series,
        "step_s": stats(step_s),
    }
    return {
        "peer": "none (capacity of our KV pool)",
        "raw": raw,
        "ratios": {
            "admitted_over_planned": peak["running"] / planned if planned else float("nan"),
            "preemptions": float(raw["preemptions"]),
            "most_stored_over_pool": raw["most_stored"],
            "kv_wasted_over_allocated": raw["wasted_fraction"],
        },
        "notes": {
            "planned_sessions": "floor(num_blocks x block_size / (prompt_len + output_len))",
            "admitted_sessions": "most sessions running at once",
            "preemptions": "over the whole run (goal: 0 at <= planned sessions)",
            "demand_at_peak": "(blocks held + blocks projected for admitted decodes) / pool",
            "most_stored": "the most tokens whose K/V the pool held at once / pool tokens",
            "wasted_fraction": "(blocks allocated x block_size - tokens stored) / "
            "(blocks allocated x block_size) at the peak",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="HF directory (default: SmolLM2)")
    p.add_argument("--num-blocks", type=int, default=640, help="W5's pool (CPU)")
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=50)
    p.add_argument("--paging-blocks", type=int, default=1280, help="W5-paging's pool")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    kind = "cpu" if device.type == "cpu" else "gpu"
    model = args.model or "SmolLM2-135M-Instruct"
    cfg = W5Config(prompt_len=args.prompt_len, output_len=args.output_len, num_blocks=args.num_blocks,
                   max_model_len=2048, max_num_seqs=256, max_s=1800.0)  # fmt: skip
    with LLM(args.model, device=args.device, num_blocks=cfg.num_blocks,
             max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
             max_num_batched_tokens=4096) as llm:  # fmt: skip
        result = run_w5(llm, cfg)
    result["config"] = {"model": model, **{k: getattr(cfg, k) for k in cfg.__slots__}}
    path = write_result(RESULTS_DIR, kind, "W5", environment(device), {}, result)
    print({k: round(v, 3) for k, v in result["ratios"].items()}, f"-> {path}")
    with LLM(args.model, device=args.device, num_blocks=args.paging_blocks, max_model_len=2048,
             max_num_seqs=200, max_num_batched_tokens=4096) as llm:  # fmt: skip
        raw = paging.run_paging(llm, 200)
    path = write_result(RESULTS_DIR, kind, "W5-paging", environment(device), {},
                        paging.result_of(raw, model))  # fmt: skip
    print({k: raw[k] for k in ("contiguous_sessions", "paged_sessions", "peak_running",
                               "waste_at_peak", "stopped")}, f"-> {path}")  # fmt: skip
    report.write_report(RESULTS_DIR, report.DOCS_PATH)
    return 0 if result["raw"]["preemptions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
