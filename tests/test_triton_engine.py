"""The engine on the Triton backend gives the same tokens as on the torch reference
and as transformers (on CUDA for real; on CPU through Triton's interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.factories import hf_greedy, random_prompts

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", ["llama-hd16", "mistral-hd16"])
def test_triton_backend_matches_reference_and_transformers(
    name: str, tiny_dirs: dict[str, Path]
) -> None:
    path = tiny_dirs[name]
    prompts = random_prompts(3, 9, 40, vocab=512, seed=11)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # A 32-token budget makes chunked prefill and mixed decode/prefill steps.
    kw = dict(
        device=DEVICE, dtype="float32", max_model_len=128, max_num_batched_tokens=32, block_size=8
    )
    # On a GPU both engines live at once; each takes a share of the device.
    ours = LLM(path, attention_backend="triton", gpu_memory_utilization=0.1, **kw)
    assert ours.engine.runner.uses_triton
    got = [o.outputs[0].token_ids for o in ours.generate(prompts, params)]
    ref = [
        o.outputs[0].token_ids
        for o in LLM(path, attention_backend="torch", gpu_memory_utilization=0.3, **kw).generate(
            prompts, params
        )
    ]
    assert got == ref
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    with torch.device(DEVICE):
        assert got == [hf_greedy(hf, p, 12) for p in prompts]
    # A prefix-cache hit goes through the prefill kernel's cached-prefix path.
    again = ours.generate(prompts[:1], params)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == got[0]
    assert ours.engine.pool_is_whole()


def test_backend_selection(tiny_dirs: dict[str, Path]) -> None:
    from engine.attention import TorchAttentionBackend, select_backend

    assert select_backend("auto", torch.device("cpu"), 64) is TorchAttentionBackend
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        select_backend("triton", torch.device("cpu"), 8)
    with pytest.raises(ValueError, match="attention_backend"):
        select_backend("flash", torch.device("cpu"), 64)
