"""W9: the ShareGPT offline throughput run (``bench.sharegpt``'s 1000 length pairs), the
workload of vLLM's and SGLang's published throughput figures.

Ours: every request submitted at once (one ``LLM.generate``), prompt ids random of each
pair's prompt length, output forced to its answer's length (``ignore_eos``); output tok/s
and total tok/s. The peer, HF ``generate_batch``, cannot force a length per request: it
runs the first ``peer_requests`` prompts with the mean answer length of those, and ours
runs the same subset the same way, for the ratio. The published H100 figures are quoted
beside ours (``PUBLISHED``), on another device and tokenizer: a reference, not a ratio of
one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from bench import sharegpt
from bench.drivers import greedy, timed
from bench.gpu_env import GPUEnv, hf_generate_batch
from bench.gpu_workloads import error_result
from engine.sampling_params import SamplingParams

# Output tok/s on ShareGPT, Llama-3-8B on one H100 (SGLang's v0.2 blog, 2024-07-25,
# "Achieving Faster Open-Source Llama3 Serving with SGLang Runtime", offline benchmark).
PUBLISHED = {"sglang_h100_output_tok_s": 16215.0, "vllm_h100_output_tok_s": 12553.0}
TOKEN_MARGIN = 100


@dataclass(frozen=True, slots=True)
class W9Config:
    num_requests: int = 1000
    peer_requests: int = 128
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    seed: int = 0


def _prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(TOKEN_MARGIN, vocab - TOKEN_MARGIN, size=n).tolist() for n in lengths]


def _rates(wall: float, prompt_tokens: int, output_tokens: int) -> dict[str, float]:
    return {"wall_s": wall, "output_tokens": output_tokens,
            "output_tok_s": output_tokens / wall,
            "total_tok_s": (prompt_tokens + output_tokens) / wall}  # fmt: skip


TAIL_BATCH = 64  # steps with fewer running requests than this are "the tail"


def _step_split(llm: Any, run: Any) -> tuple[Any, dict[str, float]]:
    """``run()``'s result and where its engine steps spent the time: the count and
    seconds of steps that started with fewer than ``TAIL_BATCH`` running requests
    (the long outputs finishing alone) and of the rest (host-timed ``step`` calls)."""
    engine = llm.engine
    step = engine.step
    split = {"steps": 0.0, "s": 0.0, "tail_steps": 0.0, "tail_s": 0.0}

    def timed_step() -> Any:
        tail = len(engine.scheduler.running) < TAIL_BATCH
        t0 = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t0
        split["tail_steps" if tail else "steps"] += 1
        split["tail_s" if tail else "s"] += dt
        return out

    engine.step = timed_step
    try:
        return run(), split
    finally:
        del engine.step


def _ours(env: GPUEnv, cfg: W9Config, prompts: list[list[int]], params: list[SamplingParams],
          sub: list[list[int]], sub_out: int) -> dict[str, Any]:  # fmt: skip
    """Our engine: every request at once, then the peer's subset."""
    llm = env.ours(max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                   max_num_batched_tokens=cfg.max_num_batched_tokens)  # fmt: skip
    env.log(f"W9 ours: {len(prompts)} ShareGPT requests")
    runs: dict[str, tuple[list[list[int]], SamplingParams | list[SamplingParams]]] = {
        "ours": (prompts, params), "ours_subset": (sub, greedy(sub_out))}  # fmt: skip
    raw: dict[str, Any] = {}
    for name, (batch, sp) in runs.items():
        (wall, outs), split = _step_split(
            llm, partial(timed, env.device, partial(llm.generate, batch, sp))
        )
        raw[name] = _rates(wall, sum(len(p) for p in batch),
                           sum(len(o.outputs[0].token_ids) for o in outs))  # fmt: skip
        raw[name]["steps"] = split
    return {**raw, "preemptions": llm.engine.scheduler.num_preemptions}


def run_w9(env: GPUEnv, cfg: W9Config) -> dict[str, Any]:
    mix = sharegpt.load()
    pairs = mix["pairs"][: cfg.num_requests]
    prompts = _prompts([p for p, _ in pairs], env.vocab_size, cfg.seed)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in pairs]
    sub = prompts[: cfg.peer_requests]
    sub_out = round(sum(o for _, o in pairs[: cfg.peer_requests]) / len(sub))
    full_prompt, sub_prompt = sum(len(p) for p in prompts), sum(len(p) for p in sub)
    raw: dict[str, Any] = {
        "mean_prompt_len": full_prompt / len(prompts),
        "mean_output_len": sum(o for _, o in pairs) / len(pairs),
        "tokenizer": mix["tokenizer"],
        **_ours(env, cfg, prompts, params, sub, sub_out),
    }
    env.free()
    result: dict[str, Any] = {}
    try:
        env.log(f"W9 peer: {len(sub)} requests x {sub_out} tokens (generate_batch)")
        hf_generate_batch(env.peer(), env.device, sub[:4], 8)  # warm-up
        env.free()
        out = hf_generate_batch(env.peer(), env.device, sub, sub_out)
        span = out["span_s"]
        wall = min(out["call_s"], span) if span else out["call_s"]
        raw["peer_subset"] = _rates(wall, sub_prompt, sum(len(x) for x in out["outputs"]))
    except Exception as e:
        result["peer_error"] = error_result(e)
        env.log(f"W9 peer failed: {result['peer_error']}")
    ours = raw["ours"]["output_tok_s"]
    ratios = {"output_tok_s": ours, "total_tok_s": raw["ours"]["total_tok_s"],
              **{f"ours_over_{k.removesuffix('_output_tok_s')}": ours / v
                 for k, v in PUBLISHED.items()}}  # fmt: skip
    if "peer_subset" in raw:
        ratios["subset_output_tok_s_ours_over_peer"] = (
            raw["ours_subset"]["output_tok_s"] / raw["peer_subset"]["output_tok_s"]
        )
    return {
        **result,
        "peer": f"HF generate_batch on the first {len(sub)} requests; published SGLang/vLLM "
        "H100 figures (SGLang blog 2024-07-25) quoted beside",
        "raw": {**raw, "published": PUBLISHED, "subset_output_len": sub_out},
        "ratios": ratios,
        "notes": {
            "output_tok_s": "generated tokens / wall seconds, all 1000 requests at once",
            "total_tok_s": "(prompt + generated tokens) / wall seconds",
            "steps": f"engine steps and their seconds: tail_* those that began with fewer "
            f"than {TAIL_BATCH} requests running, the others without prefix",
            "ours_over_*": "our output tok/s (this device) over the published H100 figure",
            "subset_*": f"the first {len(sub)} requests, every output {sub_out} tokens, "
            "ours and the peer in this run",
        },
    }
