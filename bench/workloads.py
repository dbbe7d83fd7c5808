"""The workloads of BENCHMARKS.md, each run on our engine and on a Hugging Face peer.

Every ``run_wN(ctx, cfg)`` returns ``{"peer", "config", "raw", "ratios", "notes"}`` for
``common.write_result``; ``notes`` says what each figure means. The sizes live in the
``WnConfig`` dataclasses, so a GPU suite reuses the functions with its own sizes and
adds its own workloads to ``WORKLOADS``. Greedy decoding, fixed output lengths
(``ignore_eos`` / ``min_new_tokens``), random token prompts throughout.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import common_prefix, random_prompts, stats
from bench.drivers import (
    Context,
    TimingStreamer,
    greedy,
    ours_token_times,
    peer_generate,
    timed,
    warm_up,
)
from engine import SamplingParams

Result = dict[str, Any]


# --- W1 offline mix --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W1Config:
    num_requests: int = 32
    prompt_len_min: int = 32
    prompt_len_max: int = 256
    output_len: int = 32
    peer_batch_size: int = 32
    seed: int = 0


def run_w1(ctx: Context, cfg: W1Config) -> Result:
    """Throughput on a batch of mixed-length requests: ours is one ``LLM.generate`` call
    with every prompt; the peer is batched HF ``generate`` in ``peer_batch_size`` chunks."""
    prompts = random_prompts(
        cfg.num_requests, cfg.prompt_len_min, cfg.prompt_len_max, ctx.vocab_size, cfg.seed
    )
    prompt_tokens = sum(len(p) for p in prompts)
    ours_s, outs = timed(ctx.device, lambda: ctx.ours.generate(prompts, greedy(cfg.output_len)))
    ours_ids = [o.outputs[0].token_ids for o in outs]

    def peer() -> list[list[int]]:
        b = cfg.peer_batch_size
        return [
            row
            for i in range(0, len(prompts), b)
            for row in peer_generate(ctx, prompts[i : i + b], cfg.output_len)
        ]

    peer_s, peer_ids = timed(ctx.device, peer)
    raw: dict[str, Any] = {"prompt_tokens": prompt_tokens}
    for name, wall, ids in (("ours", ours_s, ours_ids), ("peer", peer_s, peer_ids)):
        out_tokens = sum(len(x) for x in ids)
        raw[name] = {
            "wall_s": wall,
            "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall,
            "total_tok_s": (prompt_tokens + out_tokens) / wall,
        }
    c = ctx.ceilings
    floor_s = max(
        ctx.facts.compute_floor_s(
            prompt_tokens + cfg.num_requests * cfg.output_len, c["matmul_flop_per_s"]
        ),
        cfg.output_len * ctx.facts.weight_bytes / c["copy_bytes_per_s"],
    )
    raw["floor_s"] = floor_s
    same = sum(common_prefix(a, b) for a, b in zip(ours_ids, peer_ids, strict=True))
    raw["greedy_agreement"] = same / max(1, sum(len(a) for a in ours_ids))
    return {
        "peer": f"HF generate, batched by {cfg.peer_batch_size}, left padding",
        "config": asdict(cfg),
        "raw": raw,
        "ratios": {
            "output_tok_s_ours_over_peer": raw["ours"]["output_tok_s"]
            / raw["peer"]["output_tok_s"],
            "total_tok_s_ours_over_peer": raw["ours"]["total_tok_s"] / raw["peer"]["total_tok_s"],
            "ours_wall_over_floor": ours_s / floor_s,
            "peer_wall_over_floor": peer_s / floor_s,
        },
        "notes": {
            "wall_s": "seconds for all requests, prompt processing included",
            "output_tok_s": "generated tokens / wall_s",
            "total_tok_s": "(prompt tokens without padding + generated tokens) / wall_s",
            "floor_s": "max(2 x matmul params x all tokens / matmul rate, output_len x weight bytes / copy rate)",
            "greedy_agreement": "share of our tokens in the common prefix with the peer's (sanity, not a claim)",
            "*_over_peer": "ours / peer: above 1 means we are faster",
            "*_wall_over_floor": "wall / floor: 1 would be the hardware limit",
        },
    }


# --- W2 batch-1 latency --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W2Config:
    prompt_len: int = 128
    output_len: int = 256
    seed: int = 1


def latency_of(t0: float, times: list[float]) -> dict[str, Any]:
    itl = [b - a for a, b in itertools.pairwise(times)]
    decode_s = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "ttft_s": times[0] - t0,
        "itl_s": itl,
        "itl": stats(itl),
        "decode_tok_s": len(itl) / decode_s,
        "e2e_tok_s": len(times) / (times[-1] - t0),
    }


def run_w2(ctx: Context, cfg: W2Config) -> Result:
    """Batch-1 latency: one request, the time each token arrives. Ours streams through
    ``engine.step()``; the peer's times come from a ``generate`` streamer."""
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, ctx.vocab_size, cfg.seed)
    t0, ours_times = ours_token_times(ctx.ours, prompt, greedy(cfg.output_len), ctx.device)
    streamer = TimingStreamer(ctx.device)
    gc.collect()
    p0 = time.perf_counter()
    peer_generate(ctx, [prompt], cfg.output_len, streamer=streamer)
    ours, peer = latency_of(t0, ours_times), latency_of(p0, streamer.times)
    rate = ctx.ceilings["copy_bytes_per_s"]
    # The step producing token k + 2 attends to prompt_len + k + 1 positions.
    floors = [
        ctx.facts.decode_floor_s(cfg.prompt_len + k + 1, rate) for k in range(cfg.output_len - 1)
    ]
    floor = sum(floors) / len(floors) if floors else float("nan")
    return {
        "peer": "HF generate (streamer timing)",
        "config": asdict(cfg),
        "raw": {"ours": ours, "peer": peer, "floor_itl_s": floors, "floor_itl_mean_s": floor},
        "ratios": {
            "itl_median_peer_over_ours": peer["itl"]["median"] / ours["itl"]["median"],
            "itl_p99_peer_over_ours": peer["itl"]["p99"] / ours["itl"]["p99"],
            "decode_tok_s_ours_over_peer": ours["decode_tok_s"] / peer["decode_tok_s"],
            "ours_itl_median_over_floor": ours["itl"]["median"] / floor,
            "peer_itl_median_over_floor": peer["itl"]["median"] / floor,
        },
        "notes": {
            "ttft_s": "start of the request to its first token (prompt processing)",
            "itl_s": "inter-token latency: gap between consecutive tokens, one per decode step",
            "decode_tok_s": "decode steps / (last token time - first token time) = 1 / mean ITL",
            "e2e_tok_s": "output tokens / (last token time - start)",
            "floor_itl_s": "per step: (weight bytes + KV bytes attended) / measured copy rate",
            "*_peer_over_ours": "peer ITL / our ITL: speedup, above 1 means we are faster",
            "*_over_floor": "median ITL / mean floor: 1 would be the memory-bandwidth limit",
        },
    }


# --- W3 what the cache buys -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class W3Config:
    prompt_len: int = 1000
    output_len: int = 100
    max_model_len: int = 2048  # of the recompute engine (``kv_cache=False``)
    seed: int = 2


def _ours_recompute_wall(
    ctx: Context, cfg: W3Config, prompt: list[int], sp: SamplingParams
) -> float:
    """Wall seconds of ``prompt`` on a fresh, warmed-up ``kv_cache=False`` engine."""
    recompute = ctx.make_ours(kv_cache=False, max_model_len=cfg.max_model_len)
    warm_up(ctx, recompute)
    wall, _ = timed(ctx.device, lambda: recompute.generate([prompt], sp))
    return wall


def _peer_wall(ctx: Context, cfg: W3Config, prompt: list[int], use_cache: bool) -> float:
    wall, _ = timed(
        ctx.device, lambda: peer_generate(ctx, [prompt], cfg.output_len, use_cache=use_cache)
    )
    return wall


def run_w3(ctx: Context, cfg: W3Config) -> Result:
    """One long request with the KV cache vs recomputing every key and value each step,
    for our engine (``kv_cache=False``) and HF (``use_cache=False``)."""
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, ctx.vocab_size, cfg.seed)
    sp = greedy(cfg.output_len)
    walls: dict[str, float] = {}
    walls["ours_cache_s"], _ = timed(ctx.device, lambda: ctx.ours.generate([prompt], sp))
    walls["ours_recompute_s"] = _ours_recompute_wall(ctx, cfg, prompt, sp)
    for name, use_cache in (("peer_cache_s", True), ("peer_recompute_s", False)):
        walls[name] = _peer_wall(ctx, cfg, prompt, use_cache)
    return {
        "peer": "HF generate(use_cache=True/False)",
        "config": asdict(cfg),
        "raw": walls,
        "ratios": {
            "ours_cache_speedup": walls["ours_recompute_s"] / walls["ours_cache_s"],
            "peer_cache_speedup": walls["peer_recompute_s"] / walls["peer_cache_s"],
            "cache_peer_over_ours": walls["peer_cache_s"] / walls["ours_cache_s"],
            "recompute_peer_over_ours": walls["peer_recompute_s"] / walls["ours_recompute_s"],
        },
        "notes": {
            "*_cache_s": "wall seconds of the whole request (prompt + every output token) with the KV cache",
            "*_recompute_s": "the same, recomputing keys and values of the whole sequence every step",
            "*_cache_speedup": "recompute wall / cache wall: what the cache buys",
            "*_peer_over_ours": "peer wall / our wall: above 1 means we are faster",
        },
    }


WORKLOADS: dict[str, Callable[[Context, Any], Result]] = {"W1": run_w1, "W2": run_w2, "W3": run_w3}
