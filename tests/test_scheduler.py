"""The scheduler alone (pure Python): budget, chunking, FCFS, preemption, abort."""

from __future__ import annotations

import subprocess
import sys

from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make(
    num_blocks: int = 16,
    block_size: int = 4,
    budget: int = 32,
    max_seqs: int = 8,
    chunked: bool = True,
    admission: str = "committed",
) -> Scheduler:
    """Budget, chunking and preemption tests admit on committed blocks (they overcommit
    on purpose); the projected-admission tests below ask for it."""
    kv = KVCacheManager(BlockPool(num_blocks), block_size)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=64,
        enable_chunked_prefill=chunked,
        kv_admission=admission,
    )
    return Scheduler(cfg, kv)


def req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(), max_tokens=32)


def run_step(s: Scheduler, token: int = 7) -> list[tuple[str, int, bool]]:
    """One step with a fake model: every request that samples gets ``token``."""
    out = s.schedule()
    s.update_after_step(out)
    for sr in out.scheduled:
        if sr.needs_sample:
            s.requests[sr.request_id].append_output_token(token)
    return [(sr.request_id, sr.num_new_tokens, sr.needs_sample) for sr in out.scheduled]


def test_prompts_are_chunked_to_the_token_budget() -> None:
    s = make(budget=8)
    s.add_request(req("a", 20))
    assert run_step(s) == [("a", 8, False)]
    assert run_step(s) == [("a", 8, False)]
    assert run_step(s) == [("a", 4, True)]
    assert run_step(s) == [("a", 1, True)]  # decode


def test_decodes_go_first_and_waiting_requests_share_the_rest() -> None:
    s = make(budget=10)
    s.add_request(req("a", 6))
    assert run_step(s) == [("a", 6, True)]
    s.add_request(req("b", 12, base=100))
    s.add_request(req("c", 3, base=200))
    # a decodes (1 token), b takes the remaining 9 as a chunk; c waits (FCFS).
    assert run_step(s) == [("a", 1, True), ("b", 9, False)]
    assert run_step(s) == [("a", 1, True), ("b", 3, True), ("c", 3, True)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    s = make(num_blocks=64, budget=64, chunked=False)
    s.add_request(req("a", 40))
    s.add_request(req("b", 30, base=100))
    assert run_step(s) == [("a", 40, True)]  # 24 tokens left: b is not split
    assert run_step(s) == [("a", 1, True), ("b", 30, True)]


def test_max_num_seqs_caps_the_batch() -> None:
    s = make(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 2, base=10 * i))
    assert [r for r, _, _ in run_step(s)] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_newest_request_is_preempted_and_recomputed_later() -> None:
    s = make(num_blocks=4, block_size=4, budget=32)
    s.add_request(req("old", 7))
    s.add_request(req("new", 7, base=100))
    run_step(s)  # both prefilled: 2 blocks each, pool full
    assert s.kv is not None and s.kv.pool.num_free_blocks == 0
    run_step(s)  # 8 tokens each now: both still fit in 2 blocks
    out = s.schedule()  # the 9th token needs a third block: "new" gives way
    assert out.preempted == ["new"]
    assert [sr.request_id for sr in out.scheduled] == ["old"]
    new = next(r for r in s.waiting if r.request_id == "new")
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_preemptions == 1


def test_a_request_whose_token_is_on_the_device_is_not_preempted() -> None:
    """Async scheduling: "new" has its token in flight (it may be a prefill-only request
    about to hand its blocks over), so "old" gives way when "mid" needs a block."""
    s = make(num_blocks=6, block_size=4, budget=32)
    for rid, base in (("old", 0), ("mid", 100), ("new", 200)):
        s.add_request(req(rid, 7, base=base))
    run_step(s)
    run_step(s)  # 8 tokens each: 6 blocks, the pool is full
    pending = next(r for r in s.running if r.request_id == "new")
    pending.num_pending = 1  # as if the step in flight sampled its next token
    pending.max_tokens = pending.num_output_tokens + 1  # ... its last: not scheduled again
    out = s.schedule()  # "old" needs a third block: "new" would be the newest victim
    assert out.preempted == ["mid"]
    assert pending.status == RequestStatus.RUNNING and pending in s.running


def test_abort_frees_blocks_whether_waiting_or_running() -> None:
    s = make(budget=8)
    s.add_request(req("a", 20))
    s.add_request(req("b", 4, base=50))
    run_step(s)  # a holds a chunk's blocks; b waits
    assert s.abort("a") is not None
    assert s.abort("b") is not None
    assert s.abort("zzz") is None
    assert s.kv is not None
    s.kv.pool.check()
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks
    assert s.num_unfinished == 0


def test_recompute_mode_schedules_whole_sequences_every_step() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False
    )
    s = Scheduler(cfg, None)
    s.add_request(req("a", 5))
    assert run_step(s) == [("a", 5, True)]
    assert run_step(s) == [("a", 6, True)]
    assert run_step(s) == [("a", 7, True)]


def test_control_plane_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import engine.scheduler, engine.block_pool, engine.kv_cache_manager, engine.request\n"
        "import engine.sampling_params, engine.config, engine.scheduler_output, engine.block_hash\n"
        "import engine.kv_budget\n"
        "assert 'torch' not in sys.modules, 'control plane imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- projected admission (engine.kv_budget) --------------------------------------------
def drive(s: Scheduler, max_steps: int = 10_000) -> list[int]:
    """Runs a fake model to the end (each request stops at its ``max_tokens``); returns
    the running count per step. Checks the pool after each step."""
    running = []
    for _ in range(max_steps):
        if not s.num_unfinished:
            break
        run_step(s)
        assert s.kv is not None
        s.kv.pool.check()
        running.append(len(s.running))
        for r in list(s.running):
            if r.num_output_tokens >= r.max_tokens:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
    assert not s.num_unfinished
    return running


def bounded(rid: str, n: int, max_tokens: int, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)  # fmt: skip


def test_projected_admission_holds_the_planned_sessions_and_never_preempts() -> None:
    # Sessions of 7 prompt + 9 output tokens = 4 blocks of 4: a 16-block pool plans 4.
    s = make(num_blocks=16, block_size=4, budget=64, admission="projected")
    for i in range(6):
        s.add_request(bounded(f"r{i}", 7, 9, base=10 * i))
    running = drive(s)
    assert max(running) == 4 and running[0] == 4
    assert s.num_preemptions == 0
    committed = make(num_blocks=16, block_size=4, budget=64)  # the overcommitting way
    for i in range(6):
        committed.add_request(bounded(f"r{i}", 7, 9, base=10 * i))
    drive(committed)
    assert committed.num_preemptions > 0


def test_unbounded_requests_reserve_a_watermark() -> None:
    s = make(num_blocks=16, block_size=4, budget=64, admission="projected")
    s.config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                               kv_admission="projected", unbounded_reserve_tokens=8)  # fmt: skip
    for i in range(6):
        r = Request(f"u{i}", list(range(10 * i, 10 * i + 8)), SamplingParams(max_tokens=None), 56)
        s.add_request(r)
    s.update_after_step(s.schedule())
    # Each holds 2 blocks and reserves 2 more (8 tokens): 4 fit in 16 blocks.
    assert len(s.running) == 4
    assert s.projected_blocks() == 8 and s.kv is not None and s.kv.pool.num_free_blocks == 8
