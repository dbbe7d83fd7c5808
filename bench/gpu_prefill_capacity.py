"""The GPU workloads W4 (prefill), W5 (capacity), W5-paging and W10 of BENCHMARKS.md.

Same conventions as ``gpu_workloads``: ours first, then the peer; a failing peer is
recorded under ``peer_error``. W5 has no peer: it drops the resident HF model first,
so our engine plans its KV pool on an otherwise empty GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench import capacity, multiturn, paging
from bench.capacity import W5Config
from bench.common import random_prompts
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


# --- W5 capacity, W5-paging and W10 (engine-agnostic bodies: bench.capacity, .paging, .multiturn)
def run_w5(env: GPUEnv, cfg: W5Config) -> Result:
    """W5 on an otherwise empty GPU (the HF peer dropped), the engine's own plan, eager
    (decode CUDA graphs would only cost capture time and memory here)."""
    env.drop_peer()
    extra = {} if cfg.num_blocks is None else {"num_blocks": cfg.num_blocks}
    llm = env.ours(max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                   enforce_eager=True, kv_admission=cfg.kv_admission, **extra)  # fmt: skip
    result = capacity.run_w5(llm, cfg, env.log)
    del llm
    env.free()
    return result


@dataclass(frozen=True, slots=True)
class PagingConfig:
    num_requests: int = 2400  # more than the engine's own pool holds (~1,800 on an H200)
    max_model_len: int = 2048
    num_blocks: int | None = None  # None: the engine's own plan


def run_w5_paging(env: GPUEnv, cfg: PagingConfig) -> Result:
    """W5-paging (``bench.paging``) on the GPU's own pool: ShareGPT sessions, paged vs
    a contiguous reservation of the same memory."""
    env.drop_peer()
    extra = {} if cfg.num_blocks is None else {"num_blocks": cfg.num_blocks}
    llm = env.ours(max_num_seqs=cfg.num_requests, max_model_len=cfg.max_model_len,
                   max_num_batched_tokens=16384, enforce_eager=True, **extra)  # fmt: skip
    raw = paging.run_paging(llm, cfg.num_requests)
    env.log(f"W5-paging: {raw['contiguous_sessions']} contiguous, {raw['paged_sessions']} paged, "
            f"peak {raw['peak_running']} running ({raw['stopped']})")  # fmt: skip
    del llm
    env.free()
    return paging.result_of(raw, "llama3-8b-shape")


def run_w10(env: GPUEnv, cfg: multiturn.W10Config) -> Result:
    """W10 (``bench.multiturn``) on the synthetic model: tier off, then on."""
    env.drop_peer()

    def make_llm(dry: bool = False, **kw: Any) -> Any:
        if dry:
            m = env.config
            heads = m.num_key_value_heads
            dtype_bytes = torch.empty((), dtype=env.dtype).element_size()
            per_token = m.num_hidden_layers * 2 * heads * (m.hidden_size // m.num_attention_heads)
            return {"block_size": 16, "bytes_per_token": per_token * dtype_bytes}
        return env.ours(**kw)

    return multiturn.run_w10(make_llm, cfg, env.log, env.free)
