"""The host-memory KV tier: evicted prefixes spill to host memory and come back by copy.

Every test runs the same requests with the tier off and on and asks for identical
tokens; with it on, some prefix hits must have come from the host (restored, not
recomputed), fewer prompt tokens computed, and both pools whole at the end. Placements
covered: multi-turn conversations on a pool smaller than their working set (SmolLM2),
preemption, async scheduling, tensor parallel (each rank copies its own heads), a
disaggregated prefill -> decode handoff, and the served path's accounting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineArgs
from tests.factories import random_prompts, serving
from workers.kv_transfer import pack_blocks, unpack_blocks

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
MIB = 1024**2


def conversations(num: int, turns: int, seed: int) -> list[list[list[int]]]:
    """``num`` conversations of ``turns`` prompts; each turn's prompt extends the last
    (a shared system prefix, then its own history and a new user message)."""
    system = random_prompts(1, 48, 48, 512, seed=seed)[0]
    convs = []
    for c in range(num):
        history = system + random_prompts(1, 20, 30, 512, seed=seed + 100 + c)[0]
        turns_of_c = []
        for t in range(turns):
            history = history + random_prompts(1, 10, 24, 512, seed=seed + 1000 * c + t)[0]
            turns_of_c.append(list(history))
        convs.append(turns_of_c)
    return convs


def run_rounds(eng: LLMEngine, convs: list[list[list[int]]]) -> dict[str, Any]:
    """Turn t of every conversation is submitted together (a round); rounds in order.
    Returns tokens per request, host-cached tokens per request and engine counters."""
    tokens: dict[str, list[int]] = {}
    host: dict[str, int] = {}
    for t in range(len(convs[0])):
        for c, conv in enumerate(convs):
            eng.add_request(conv[t], GREEDY, f"c{c}t{t}")
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    tokens[out.request_id] = out.outputs[0].token_ids
                    host[out.request_id] = out.num_host_cached_tokens
                    assert out.num_host_cached_tokens <= out.num_cached_tokens
    assert eng.pool_is_whole()
    assert eng.kv is not None
    pool, sched = eng.kv.pool, eng.scheduler
    return {"tokens": tokens, "host": host, "spilled": pool.num_spilled,
            "restored": pool.num_restored, "preemptions": sched.num_preemptions,
            "computed": sched.prompt_tokens_computed}  # fmt: skip


def engine(model: Path | str | None, host: int, **kw: Any) -> LLMEngine:
    return LLMEngine(EngineArgs(model=model, device="cpu", host_kv_cache_bytes=host, **kw))


def test_smollm2_conversations_beyond_the_pool_restore_from_the_host(smollm2_dir: Path) -> None:
    """Four conversations of three turns on a 16-block pool (256 tokens: less than one
    round's prompts): turn 2 and 3 find their history on the host tier."""
    convs = conversations(4, 3, seed=5)
    kw = {"num_blocks": 16, "max_model_len": 256}
    off = run_rounds(engine(smollm2_dir, 0, **kw), convs)
    on = run_rounds(engine(smollm2_dir, 8 * MIB, **kw), convs)
    assert on["tokens"] == off["tokens"]
    assert on["spilled"] > 0 and on["restored"] > 0
    assert sum(on["host"].values()) > 0 and off["restored"] == 0
    assert on["computed"] < off["computed"]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_a_tiny_host_tier_give_the_same_tokens(
    tiny_dirs: dict[str, Path], async_scheduling: bool
) -> None:
    """Committed admission on a small pool preempts; a host tier of 8 blocks keeps
    replacing its entries (a restore's source is never overwritten before it is read)."""
    convs = conversations(6, 3, seed=9)
    kw = {"num_blocks": 20, "block_size": 8, "max_model_len": 160, "max_num_batched_tokens": 48,
          "kv_admission": "committed", "async_scheduling": async_scheduling}  # fmt: skip
    model = tiny_dirs["llama3"]
    eng = engine(model, 0, **kw)
    block_bytes = sum(c[:, 0].numel() * c.element_size() for c in eng.runner.kv_caches)
    off = run_rounds(eng, convs)
    eng = engine(model, 8 * block_bytes, **kw)
    assert eng.executor.num_host_blocks == 8
    on = run_rounds(eng, convs)
    assert on["tokens"] == off["tokens"]
    assert off["preemptions"] > 0 and on["restored"] > 0


def test_tensor_parallel_ranks_spill_and_restore_their_own_heads(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    convs = conversations(4, 3, seed=13)
    model = tiny_dirs["llama3"]
    kw = {"num_blocks": 24, "block_size": 8, "max_model_len": 160}
    off = run_rounds(engine(model, 0, **kw), convs)
    with LLM(model, device="cpu", tensor_parallel_size=2, host_kv_cache_bytes=4 * MIB,
             **kw) as llm:  # fmt: skip
        on = run_rounds(llm.engine, convs)
    assert on["tokens"] == off["tokens"]
    assert on["restored"] > 0


def test_disaggregated_prefill_with_a_host_tier_hands_over_the_same_kv(
    tiny_dirs: dict[str, Path],
) -> None:
    """A prefill instance on a small pool restores earlier turns from its host tier
    before handing the prompt over; the decode instance (tier on too) gets the blocks
    of the colocated run and continues with the same tokens."""
    model = tiny_dirs["llama3"]
    convs = conversations(4, 3, seed=17)
    prompts = [conv[t] for t in range(3) for conv in convs]
    ref = [o.outputs[0].token_ids for o in LLM(model, device="cpu").generate(prompts, GREEDY)]
    kw = {"block_size": 8, "max_model_len": 160}
    prefill = engine(model, 4 * MIB, num_blocks=24, **kw)
    decode = engine(model, 4 * MIB, num_blocks=40, **kw)
    got: dict[str, list[int]] = {}
    restored = 0
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        prefill.add_prefill_request(p, GREEDY, rid)
        out = next(o for o in prefill.step() if o.finished)
        assert out.kv_block_ids is not None
        restored += out.num_host_cached_tokens
        dst = decode.add_transferred_request(p, GREEDY, rid)
        assert dst is not None
        skip = len(out.kv_block_ids) - len(dst)
        unpack_blocks(decode.runner.kv_caches, dst,
                      pack_blocks(prefill.runner.kv_caches, out.kv_block_ids[skip:]))  # fmt: skip
        assert prefill.release_kv(rid)
        decode.finish_transfer(rid, out.outputs[0].token_ids[0])
        while decode.has_unfinished_requests():
            for o in decode.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
    assert [got[f"r{i}"] for i in range(len(prompts))] == ref
    assert restored > 0
    assert prefill.pool_is_whole() and decode.pool_is_whole()


def test_served_requests_report_host_hits_and_the_reset_empties_both_tiers(
    ray_cluster: Any, smollm2_dir: Path
) -> None:
    """Over HTTP: a conversation's second turn, after other prompts pushed its history
    out of a small pool, reports ``host_cached_tokens`` in the ``kvserve`` usage
    extension with the offline engine's text; the stats count host hits; a prefix-cache
    reset forgets the host tier too."""
    from ray import serve

    head = "You are a terse assistant who answers in one short sentence. " * 6
    first, other = head + "Name a color.", "Tell me about rivers and mills. " * 25
    second = first + " Blue. Name another."
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = LLM(smollm2_dir, device="cpu", max_model_len=512).generate([second], params)
    with serving(model=str(smollm2_dir), model_name="m",
                 engine={"max_model_len": 256, "num_blocks": 16,
                         "host_kv_cache_bytes": 16 * MIB}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"

        def complete(prompt: str) -> dict[str, Any]:
            r = httpx.post(f"{base}/v1/completions", timeout=300, json={
                "model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True})  # fmt: skip
            assert r.status_code == 200, r.text
            return dict(r.json())

        complete(first)
        complete(other)  # evicts the first prompt's blocks: they spill to the host
        got = complete(second)
        assert got["choices"][0]["text"] == ref[0].outputs[0].text
        kv = got["kvserve"]
        assert 0 < kv["host_cached_tokens"] <= kv["cached_tokens"], kv
        handle = serve.get_deployment_handle("engine", app_name="kvserve")
        stats = handle.stats.remote().result()
        assert stats["prefix_cache_host_hits"] >= kv["host_cached_tokens"]
        assert stats["host_cached_blocks"] > 0 and stats["host_blocks"] > 0
        r = httpx.post(f"{base}/reset_prefix_cache", timeout=60)
        assert r.status_code == 200, r.text
        assert handle.stats.remote().result()["host_cached_blocks"] == 0
        again = complete(second)
        assert again["kvserve"]["cached_tokens"] == 0
        assert again["choices"][0]["text"] == ref[0].outputs[0].text


def check_tier_copies(device: str) -> None:
    """``HostKVTier.copy`` on a random cache: spilled blocks land in their host blocks on
    every layer, restores bring them back into other device blocks, a restore in the same
    call reads the host block a spill of that call just wrote, and of two restores into
    one device block the later wins. On CUDA the copies are queued on the tier's stream;
    ``wait`` orders the current stream after them."""
    import torch

    from engine.host_tier import HostKVTier

    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 2, 10, 4, 2, 8, generator=gen).to(device)  # [L, 2, blocks, ...]
    tier = HostKVTier(6, stack)
    before = stack.clone()
    # Spills 2 -> 0, 3 -> 1 (a run), 7 -> 4; then restores 0 -> 5, 4 -> 6, 1 -> 6 (wins).
    ready = tier.copy([(2, 0), (3, 1), (7, 4)], [(0, 5), (4, 6), (1, 6)])
    if device == "cuda":
        assert ready is not None and len(ready) == 3
        tier.wait(ready)
    else:
        assert ready is None
    host = tier.host.to(device)
    for hb, d in [(0, 2), (1, 3), (4, 7)]:
        assert torch.equal(host[:, hb], before[:, :, d])
    assert torch.equal(stack[:, :, 5], before[:, :, 2])
    assert torch.equal(stack[:, :, 6], before[:, :, 3])
    untouched = [b for b in range(10) if b not in (5, 6)]
    assert torch.equal(stack[:, :, untouched], before[:, :, untouched])


def test_tier_copies_move_whole_blocks_on_every_layer() -> None:
    check_tier_copies("cpu")
