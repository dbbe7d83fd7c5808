"""The GPU workloads W1-W3 of BENCHMARKS.md (W4, W5 in ``gpu_prefill_capacity``).

Each ``run_wN(env, cfg)`` returns a result for ``common.write_result`` (``peer``,
``config``, ``raw``, ``ratios``, ``notes`` and, when the peer failed, ``peer_error``),
runs our engine's part first, frees it, then runs the peer's part (see ``gpu_env``).
Greedy decoding, fixed output lengths, random token prompts. Our weights and the peer's
are different random draws of the same shape: speed is comparable, tokens are not.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import random_prompts
from bench.drivers import TimingStreamer, greedy, hf_generate, ours_token_times, timed
from bench.gpu_env import GPUEnv, build_peer, hf_generate_batch
from bench.synthetic import w1_floor
from bench.workloads import W2Config, latency_of

Result = dict[str, Any]


def error_result(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --- W1 offline mix ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W1Config:
    num_requests: int = 256
    prompt_len_min: int = 100
    prompt_len_max: int = 1000
    output_len: int = 128
    max_num_seqs: int = 256  # ours: every request decodes in one batch
    max_num_batched_tokens: int = 4096  # ours: token budget per step (chunked prefill)
    reps: int = 3  # ours: runs of the whole set (prefix cache emptied between); the median counts
    seed: int = 0


def _w1_ours(env: GPUEnv, cfg: W1Config, prompts: list[list[int]]) -> dict[str, Any]:
    llm = env.ours(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    walls = []
    for rep in range(cfg.reps):
        llm.engine.reset_prefix_cache()  # every run computes every prompt
        env.log(f"W1 ours: {len(prompts)} requests (run {rep + 1} of {cfg.reps})")
        wall, outs = timed(env.device, lambda: llm.generate(prompts, greedy(cfg.output_len)))
        walls.append(wall)
    plan = llm.engine.runner.plan
    return {
        "wall_s": statistics.median(walls),
        "wall_s_runs": walls,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "num_blocks": plan.num_blocks if plan is not None else 0,
        "preemptions": llm.engine.scheduler.num_preemptions,
    }


def _w1_peer_warm(env: GPUEnv, prompts: list[list[int]]) -> tuple[Any, dict[str, Any]]:
    """(the model to time ``generate_batch`` on, a warm-up's result): the resident peer
    switched to each of ``BATCH_ATTN_IMPLS``, else a second copy loaded with
    ``attn_implementation="paged|sdpa"`` (how GPU-NOTES ran it in transformers 5.17)."""
    env.log("W1 peer: generate_batch warm-up")
    try:
        return env.peer(), hf_generate_batch(env.peer(), env.device, prompts, 8)
    except RuntimeError as e:
        env.log(f"W1 peer: {e}; retrying on a copy loaded with paged|sdpa")
    env.free()
    peer = build_peer(env.config, env.device, env.dtype, env.seed, attn="paged|sdpa")
    return peer, hf_generate_batch(peer, env.device, prompts, 8, ("paged|sdpa",))


def run_w1(env: GPUEnv, cfg: W1Config) -> Result:
    """Throughput: ours is one ``LLM.generate`` of every prompt; the peer is one
    ``generate_batch`` call (transformers' continuous batching)."""
    prompts = random_prompts(
        cfg.num_requests, cfg.prompt_len_min, cfg.prompt_len_max, env.vocab_size, cfg.seed
    )
    prompt_tokens = sum(len(p) for p in prompts)
    raw: dict[str, Any] = {"prompt_tokens": prompt_tokens, "ours": _w1_ours(env, cfg, prompts)}
    env.free()
    result: Result = {}
    try:
        peer, warm = _w1_peer_warm(env, prompts[:4])
        env.free()  # generate_batch sizes its cache from the memory free now
        env.log(f"W1 peer: {len(prompts)} requests ({warm['attn_implementation']})")
        out = hf_generate_batch(
            peer, env.device, prompts, cfg.output_len, (warm["attn_implementation"],)
        )
        span = out["span_s"]
        raw["peer"] = {
            "wall_s": min(out["call_s"], span) if span else out["call_s"],
            "call_s": out["call_s"],
            "span_s": span,
            "output_tokens": sum(len(x) for x in out["outputs"]),
            "attn_implementation": out["attn_implementation"],
        }
        if raw["peer"]["output_tokens"] != len(prompts) * cfg.output_len:
            env.log(f"W1 peer: WARNING {raw['peer']['output_tokens']} output tokens generated")
    except Exception as e:
        result["peer_error"] = error_result(e)
        env.log(f"W1 peer failed: {result['peer_error']}")
    for name in ("ours", "peer"):
        if name in raw:
            r = raw[name]
            r["output_tok_s"] = r["output_tokens"] / r["wall_s"]
            r["total_tok_s"] = (prompt_tokens + r["output_tokens"]) / r["wall_s"]
    floor = w1_floor(env.shape, env.dtype.itemsize, [len(p) for p in prompts], cfg.output_len,
                     env.ceilings)  # fmt: skip
    raw["floor"], raw["floor_s"] = floor, floor["floor_s"]
    ratios = {"ours_wall_over_floor": raw["ours"]["wall_s"] / floor["floor_s"]}
    if "peer" in raw:
        for k in ("output_tok_s", "total_tok_s"):
            ratios[f"{k}_ours_over_peer"] = raw["ours"][k] / raw["peer"][k]
        ratios["peer_wall_over_floor"] = raw["peer"]["wall_s"] / floor["floor_s"]
    return {
        **result,
        "peer": "HF generate_batch (continuous batching)",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "wall_s": "seconds for all requests (ours: the median of wall_s_runs); the peer's is "
            "the smaller of call_s and span_s",
            "call_s": "peer: the whole generate_batch call, its paged-cache set-up included",
            "span_s": "peer: first request created to last request finished, its own timestamps",
            "output_tok_s": "generated tokens / wall_s",
            "total_tok_s": "(prompt tokens + generated tokens) / wall_s",
            "floor_s": w1_floor.__doc__ or "",
            "*_over_peer": "ours / peer: above 1 means we are faster",
            "*_wall_over_floor": "wall / floor: 1 would be the hardware limit",
        },
    }


# --- W2 batch-1 latency (its config is the CPU suite's W2Config) ----------------------
def small_pool(max_model_len: int, block_size: int = 16) -> dict[str, Any]:
    """Engine arguments for a one-request workload: a pool of two sequences' blocks and
    ``max_num_seqs=4`` (few decode CUDA graphs to capture; batch 1 uses the first)."""
    blocks = 2 * -(-max_model_len // block_size)
    return {"max_model_len": max_model_len, "num_blocks": blocks, "max_num_seqs": 4}


def run_w2(env: GPUEnv, cfg: W2Config) -> Result:
    """Batch-1 latency: ours through ``add_request`` + ``step()``; the peer's token times
    from a ``generate`` streamer. Floor per step: (weights + KV attended) / copy rate."""
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed)
    llm = env.ours(**small_pool(cfg.prompt_len + cfg.output_len + 64))
    t0, times = ours_token_times(llm, prompt, greedy(cfg.output_len), env.device)
    del llm
    env.free()
    raw: dict[str, Any] = {"ours": latency_of(t0, times)}
    result: Result = {}
    try:
        peer = env.peer()
        streamer = TimingStreamer(env.device)
        p0 = time.perf_counter()
        hf_generate(peer, env.device, env.pad_token_id, [prompt], cfg.output_len, streamer=streamer)
        raw["peer"] = latency_of(p0, streamer.times)
    except Exception as e:
        result["peer_error"] = error_result(e)
    rate = env.ceilings["copy_bytes_per_s"]
    floors = [
        env.facts.decode_floor_s(cfg.prompt_len + k + 1, rate) for k in range(cfg.output_len - 1)
    ]
    floor = sum(floors) / len(floors)
    raw["floor_itl_s"], raw["floor_itl_mean_s"] = floors, floor
    ours = raw["ours"]
    ratios = {"ours_itl_median_over_floor": ours["itl"]["median"] / floor}
    if "peer" in raw:
        peer_lat = raw["peer"]
        ratios |= {
            "itl_median_peer_over_ours": peer_lat["itl"]["median"] / ours["itl"]["median"],
            "itl_p99_peer_over_ours": peer_lat["itl"]["p99"] / ours["itl"]["p99"],
            "decode_tok_s_ours_over_peer": ours["decode_tok_s"] / peer_lat["decode_tok_s"],
            "peer_itl_median_over_floor": peer_lat["itl"]["median"] / floor,
        }
    return {
        **result,
        "peer": "HF generate (streamer timing)",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "ttft_s": "start of the request to its first token (prompt processing)",
            "itl_s": "inter-token latency: gap between consecutive tokens, one per decode step",
            "decode_tok_s": "decode steps / (last token time - first token time) = 1 / mean ITL",
            "floor_itl_s": "per step: (weight bytes + KV bytes attended) / measured copy rate",
            "*_peer_over_ours": "peer ITL / our ITL: above 1 means we are faster",
            "*_over_floor": "median ITL / mean floor: 1 would be the memory-bandwidth limit",
        },
    }


# --- W3 what the cache buys -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W3Config:
    prompt_len: int = 2000
    output_len: int = 500
    max_model_len: int = 4096  # of both our engines
    max_run_s: float = 90.0  # a run estimated longer cuts output_len for every run
    cut_output_len: int = 100
    probe_tokens: int = 4
    seed: int = 2


def _estimate(probe_s: float, cfg: W3Config) -> float:
    """A recompute run's seconds from a ``probe_tokens`` probe: every step is a forward
    of the whole sequence, its cost growing with the sequence's mean length."""
    growth = (cfg.prompt_len + cfg.output_len / 2) / (cfg.prompt_len + cfg.probe_tokens / 2)
    return probe_s / cfg.probe_tokens * cfg.output_len * growth


def _peer_wall(env: GPUEnv, peer: Any, prompt: list[int], out_len: int, use_cache: bool) -> float:
    def run() -> Any:
        return hf_generate(
            peer, env.device, env.pad_token_id, [prompt], out_len, use_cache=use_cache
        )

    return timed(env.device, run)[0]


def _ours_wall(env: GPUEnv, prompt: list[int], out_len: int, **engine_args: Any) -> float:
    """Builds our engine, times one request on it; the engine is dropped on return."""
    llm = env.ours(**engine_args)
    return timed(env.device, lambda: llm.generate([prompt], greedy(out_len)))[0]


def _w3_ours_recompute(env: GPUEnv, cfg: W3Config, prompt: list[int], raw: dict[str, Any]) -> int:
    """Probes our ``kv_cache=False`` engine, decides the output length from both probes
    (the peer's already in ``raw``), times the recompute run; returns the length."""
    llm = env.ours(kv_cache=False, max_model_len=cfg.max_model_len, max_num_seqs=1)
    probe = greedy(cfg.probe_tokens)
    raw["ours_probe_s"] = timed(env.device, lambda: llm.generate([prompt], probe))[0]
    estimates = {
        k: _estimate(raw[f"{k}_probe_s"], cfg) for k in ("ours", "peer") if f"{k}_probe_s" in raw
    }
    out_len = cfg.cut_output_len if max(estimates.values()) > cfg.max_run_s else cfg.output_len
    raw |= {
        "estimated_recompute_s": estimates,
        "output_len_used": out_len,
        "cut": out_len != cfg.output_len,
    }
    env.log(f"W3: recompute estimates {estimates} -> output_len {out_len}")
    sp = greedy(out_len)
    raw["ours_recompute_s"] = timed(env.device, lambda: llm.generate([prompt], sp))[0]
    return out_len


def run_w3(env: GPUEnv, cfg: W3Config) -> Result:
    """One long request with the KV cache vs recomputing every key and value each step
    (ours: ``kv_cache=False``; HF: ``use_cache=False``). Both recompute runs are probed
    first; if either is estimated above ``max_run_s``, every run uses ``cut_output_len``."""
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed)
    raw: dict[str, Any] = {}
    result: Result = {}
    peer: Any = None
    try:
        peer = env.peer()
        raw["peer_probe_s"] = _peer_wall(env, peer, prompt, cfg.probe_tokens, use_cache=False)
    except Exception as e:
        result["peer_error"], peer = error_result(e), None
    out_len = _w3_ours_recompute(env, cfg, prompt, raw)
    env.free()
    raw["ours_cache_s"] = _ours_wall(env, prompt, out_len, **small_pool(cfg.max_model_len))
    env.free()
    env.log("W3: ours done")
    if peer is not None:
        try:
            raw["peer_cache_s"] = _peer_wall(env, peer, prompt, out_len, use_cache=True)
            raw["peer_recompute_s"] = _peer_wall(env, peer, prompt, out_len, use_cache=False)
        except Exception as e:
            result["peer_error"] = error_result(e)
    ratios = {"ours_cache_speedup": raw["ours_recompute_s"] / raw["ours_cache_s"]}
    if "peer_recompute_s" in raw:
        ratios |= {
            "peer_cache_speedup": raw["peer_recompute_s"] / raw["peer_cache_s"],
            "cache_peer_over_ours": raw["peer_cache_s"] / raw["ours_cache_s"],
            "recompute_peer_over_ours": raw["peer_recompute_s"] / raw["ours_recompute_s"],
        }
    return {
        **result,
        "peer": "HF generate(use_cache=True/False)",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "*_cache_s": "wall seconds of the whole request (prompt + output_len_used tokens) with the KV cache",
            "*_recompute_s": "the same, recomputing keys and values of the whole sequence every step",
            "*_probe_s": "a recompute run of probe_tokens tokens, to estimate the full run",
            "cut": "true when a recompute run was estimated above max_run_s: every run then used cut_output_len",
            "*_cache_speedup": "recompute wall / cache wall: what the cache buys",
            "*_peer_over_ours": "peer wall / our wall: above 1 means we are faster",
        },
    }
