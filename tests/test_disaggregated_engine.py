"""The engine's side of disaggregation, in one process: a prefill instance computes
prompts and keeps their blocks; a decode instance receives the blocks into ids it
allocated and continues. Greedy tokens equal the colocated engine's; pools end whole;
a transferred prompt's blocks become prefix cache on the decode side."""

from __future__ import annotations

from pathlib import Path

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineArgs
from tests.factories import random_prompts
from workers.kv_transfer import pack_blocks, unpack_blocks

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _run(engine: LLMEngine, done: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids


def test_prefill_to_decode_handoff_matches_colocated(tiny_dirs: dict[str, Path]) -> None:
    model = tiny_dirs["llama3"]
    prompts = random_prompts(6, 5, 60, 512, seed=21)
    ref = [o.outputs[0].token_ids for o in LLM(model, device="cpu").generate(prompts, GREEDY)]
    prefill = LLMEngine(EngineArgs(model=model, device="cpu", num_blocks=64))
    decode = LLMEngine(EngineArgs(model=model, device="cpu", num_blocks=48, max_model_len=256))
    # The decode instance is busy with a colocated request of its own meanwhile.
    decode.add_request(prompts[0], GREEDY, "local")
    for _ in range(3):
        decode.step()
    for i, p in enumerate(prompts):
        prefill.add_prefill_request(p, GREEDY, f"r{i}")
    firsts: dict[str, tuple[int, list[int]]] = {}
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            assert out.finished and out.kv_block_ids
            firsts[out.request_id] = (out.outputs[0].token_ids[0], out.kv_block_ids)
    done: dict[str, list[int]] = {}
    for i in reversed(range(len(prompts))):  # a different order than the prefills
        rid = f"r{i}"
        first, src = firsts[rid]
        dst = decode.add_transferred_request(prompts[i], GREEDY, rid)
        assert dst is not None
        # Only what the decode side lacks moves: prompt 0 is the running local request's
        # prompt, so its full blocks (all but the last token's) are prefix hits here.
        skip = len(src) - len(dst)
        assert skip == ((len(prompts[0]) - 1) // 16 if i == 0 else 0), (i, skip)
        unpack_blocks(decode.runner.kv_caches, dst,
                      pack_blocks(prefill.runner.kv_caches, src[skip:]))  # fmt: skip
        assert prefill.release_kv(rid)
        out = decode.finish_transfer(rid, first)
        assert out.outputs[0].token_ids == [first]
        decode.step()  # interleave admissions with decode steps
    _run(decode, done)
    assert [done[f"r{i}"] for i in range(len(prompts))] == ref
    assert done["local"] == ref[0]
    assert prefill.pool_is_whole() and decode.pool_is_whole()
    # The transferred prompt is now prefix cache on the decode side.
    decode.add_request(prompts[3], GREEDY, "again")
    outs: list = []
    while decode.has_unfinished_requests():
        outs.extend(decode.step())
    assert outs[-1].num_cached_tokens >= 16 * ((len(prompts[3]) - 1) // 16)
    assert outs[-1].outputs[0].token_ids == ref[3]


def test_seeded_sampling_continues_where_the_prefill_left_off(tiny_dirs: dict[str, Path]) -> None:
    model = tiny_dirs["llama3"]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    prompt = list(range(20, 45))
    ref = LLM(model, device="cpu").generate([prompt], sp)[0].outputs[0].token_ids
    prefill = LLMEngine(EngineArgs(model=model, device="cpu", num_blocks=32))
    decode = LLMEngine(EngineArgs(model=model, device="cpu", num_blocks=32))
    prefill.add_prefill_request(prompt, sp, "s")
    out = next(o for o in prefill.step() if o.finished)
    assert out.kv_block_ids is not None
    dst = decode.add_transferred_request(prompt, sp, "s")
    assert dst is not None
    unpack_blocks(
        decode.runner.kv_caches, dst, pack_blocks(prefill.runner.kv_caches, out.kv_block_ids)
    )
    prefill.release_kv("s")
    decode.finish_transfer("s", out.outputs[0].token_ids[0])
    done: dict[str, list[int]] = {}
    _run(decode, done)
    assert done["s"] == ref


def test_no_room_on_the_decode_side_registers_nothing(tiny_dirs: dict[str, Path]) -> None:
    decode = LLMEngine(EngineArgs(model=tiny_dirs["llama3"], device="cpu", num_blocks=8,
                                  max_model_len=128))  # fmt: skip
    first = decode.add_transferred_request(list(range(3, 103)), GREEDY, "first")
    assert first is not None and len(first) == 7
    assert decode.add_transferred_request(list(range(3, 43)), GREEDY, "more") is None
    assert decode.num_unfinished_requests == 1  # nothing registered for "more"
    decode.abort("first")  # aborted while waiting for its K/V: the blocks come back
    assert decode.pool_is_whole() and not decode.has_unfinished_requests()
    narrow = LLMEngine(EngineArgs(model=tiny_dirs["llama3"], device="cpu", num_blocks=16,
                                  max_model_len=64, max_num_seqs=2))  # fmt: skip
    assert narrow.add_transferred_request([5, 6, 7], GREEDY, "a") is not None
    assert narrow.add_transferred_request([5, 6, 8], GREEDY, "b") is not None
    assert narrow.add_transferred_request([5, 6, 9], GREEDY, "c") is None  # batch slots full


class _EngineActor:
    """An engine instance in its own process with one KV channel end."""

    def __init__(self, model: str, num_blocks: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.engine = LLMEngine(EngineArgs(model=model, device="cpu", num_blocks=num_blocks))
        self.channel = None

    def connect(self, store: str, role: int) -> None:
        from workers.kv_transfer import KVChannel

        self.channel = KVChannel(store, role, "gloo", timeout_s=60)

    def prefill(self, rid: str, prompt: list[int]) -> tuple[int, int]:
        """Runs the prompt; returns (first token, number of blocks to send)."""
        self.engine.add_prefill_request(prompt, GREEDY, rid)
        while True:
            for out in self.engine.step():
                if out.request_id == rid and out.finished:
                    assert out.kv_block_ids is not None
                    self._held = out.kv_block_ids
                    return out.outputs[0].token_ids[0], len(out.kv_block_ids)

    def send(self, rid: str) -> int:
        assert self.channel is not None
        n = self.channel.send(self.engine.runner.kv_caches, self._held)
        self.engine.release_kv(rid)
        return n

    def receive_and_decode(self, rid: str, prompt: list[int], first: int) -> list[int]:
        assert self.channel is not None
        dst = self.engine.add_transferred_request(prompt, GREEDY, rid)
        assert dst is not None
        self.channel.recv(self.engine.runner.kv_caches, dst)
        self.engine.finish_transfer(rid, first)
        done: dict[str, list[int]] = {}
        _run(self.engine, done)
        return done[rid]

    def whole(self) -> bool:
        return self.engine.pool_is_whole()


def test_handoff_between_actors_over_gloo(ray_cluster, tiny_dirs: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    import ray

    from workers.comm import new_store_path
    from workers.kv_transfer import RECEIVER, SENDER

    model = str(tiny_dirs["llama3"])
    prompts = random_prompts(3, 10, 50, 512, seed=4)
    ref = [o.outputs[0].token_ids for o in LLM(model, device="cpu").generate(prompts, GREEDY)]
    Actor = ray.remote(num_cpus=0)(_EngineActor)
    p, d = Actor.remote(model, 64), Actor.remote(model, 40)
    store = new_store_path()
    ray.get([p.connect.remote(store, SENDER), d.connect.remote(store, RECEIVER)])
    for i, prompt in enumerate(prompts):
        first, _ = ray.get(p.prefill.remote(f"r{i}", prompt))
        sent, tokens = ray.get(
            [p.send.remote(f"r{i}"), d.receive_and_decode.remote(f"r{i}", prompt, first)]
        )
        assert sent > 0 and tokens == ref[i]
    assert ray.get(p.whole.remote()) and ray.get(d.whole.remote())
    for a in (p, d):
        ray.kill(a)
