"""Chaos: parts of a running app are killed with ``ray.kill`` while requests stream, and
every request's outcome is checked, then the pools and the ledger.

- Disaggregated pools (2 prefill, 2 decode replicas of SmolLM2): a prefill replica dies
  while transfers are in flight (those requests are re-placed on the other prefill
  replica), then a decode replica dies mid-stream (its requests resume on the other).
  Every request ends with the undisturbed greedy text.
- The API replica dies mid-stream: its streams end without ``[DONE]`` (never a
  truncated answer dressed as complete), the engines abort its requests, Serve starts a
  new API replica and requests are served again.
- Disaggregated pools at TP=2: every rank's share of the K/V moves; then a rank actor
  of a decode instance dies mid-stream: the instance's engine fails, its requests
  resume on the other decode instance with the same tokens, and Serve replaces the
  broken instance.

Afterwards each pool is back to its size, every block is free, and the ledger holds no
reservation and knows the replacements.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import LLM, SamplingParams
from tests.factories import serving
from tests.serve_helpers import (
    PROMPTS,
    Stream,
    kill_a_rank_mid_stream,
    kill_replica,
    replica_ids,
    stats_of,
    wait_attached,
    wait_until,
    wait_whole,
)

MODEL = "smol-chaos"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def reference(smollm2_llm: Any) -> dict[str, str]:
    outs = smollm2_llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs, strict=True)}


def _ledger_clean(ray_cluster: Any, instances: set[str]) -> None:
    """No reservation left; every live instance reports to the ledger."""
    from cluster.placement.ledger import get_ledger

    seen: list[Any] = []

    def ok() -> bool:
        totals = ray_cluster.get(get_ledger().totals.remote())
        rows = {r["instance_id"] for r in ray_cluster.get(get_ledger().instances.remote())}
        seen[:] = [totals, rows, instances]
        return bool(totals["reserved"] == 0 and totals["reservations"] == 0 and instances <= rows)

    try:
        wait_until(ok, 30, "the ledger to be clean and know every instance")
    except AssertionError as e:
        raise AssertionError(f"{e}: {seen}") from None


def _holding_prefill(ids: set[str], timeout: float = 60) -> str:
    """A prefill replica holding blocks for a transfer it announced (the injected send
    delay keeps it there)."""
    from ray import serve

    h = serve.get_deployment_handle("prefill", app_name="kvserve")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in sorted(ids):
            s = h.stats.options().remote(target=i).result(timeout_s=30)
            if s["instance"] == i and s["free_blocks"] < s["num_blocks"]:
                return i
        time.sleep(0.05)
    raise AssertionError("no prefill replica ever held a transfer")


def test_disaggregated_pools_and_api_survive_kills(
    ray_cluster: Any, smollm2_dir: Path, reference: dict[str, str]
) -> None:
    with serving(model=str(smollm2_dir), model_name=MODEL, mode="disaggregated",
                 prefill_replicas=2, decode_replicas=2, engine={"max_model_len": 512},
                 api_replicas=1,
                 faults={"send_delay_s": 2.5, "step_delay_s": 0.02}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        prefills, decodes = replica_ids("prefill"), replica_ids("decode")
        wait_attached(base, 2)  # the streams spread over both decode replicas
        assert len(prefills) == 2 and len(decodes) == 2

        # 1. A prefill replica dies with transfers in flight, then a decode replica dies
        #    mid-stream.
        streams = [Stream(base, p, MODEL, MAX_TOKENS) for p in PROMPTS * 2]
        for s in streams:
            s.start()
        dead_prefill = _holding_prefill(prefills)  # announced, its send waiting
        kill_replica("prefill", dead_prefill)
        wait_until(lambda: all(len(s.pieces) >= 4 for s in streams), 120, "streams to run")
        busiest = max(stats_of("decode"), key=lambda st: st["running"])  # it has streams
        assert busiest["running"] > 0, busiest
        dead_decode = busiest["instance"]
        kill_replica("decode", dead_decode)
        for s in streams:
            s.join(180)
        for s in streams:
            assert s.error is None and s.done, (s.error, s.prompt)
            assert s.text == reference[s.prompt], s.prompt
            assert s.usage["completion_tokens"] == MAX_TOKENS
        modes = [s.kv["mode"] for s in streams]
        assert "resumed" in modes, modes
        # The requests the dead prefill replica held were re-placed on the other one.
        firsts = [(s.kv.get("earlier") or [s.kv])[0] for s in streams]
        moved = [k for k in firsts if dead_prefill in k.get("prefill_failures", ())]
        assert moved, firsts
        for k in moved:
            assert k["mode"] == "transferred" and k["prefill_retries"] == 1, k
            assert k["prefill_instance"] != dead_prefill, k
        for s in streams:
            if s.kv["mode"] == "resumed":
                assert s.kv["instance"] != dead_decode and s.kv["resumed_tokens"] > 0

        # 2. The (one) API replica dies mid-stream.
        (router,) = replica_ids("api")
        streams = [Stream(base, p, MODEL, MAX_TOKENS) for p in PROMPTS]
        for s in streams:
            s.start()
        wait_until(lambda: all(len(s.pieces) >= 2 for s in streams), 120, "streams to run")
        kill_replica("api", router)
        for s in streams:
            s.join(180)
        for s in streams:  # finished whole, or visibly cut off: never a short "success"
            if s.done:
                assert s.error is None and s.text == reference[s.prompt], s.prompt
            else:
                assert (
                    s.error is not None or s.status != 200 or len(s.text) < len(reference[s.prompt])
                ), s.prompt
                assert reference[s.prompt].startswith(s.text), s.prompt
        assert not all(s.done for s in streams), "the API replica died after every stream ended"
        wait_until(lambda: replica_ids("api") - {router} != set(), 120, "a new API replica")
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 120,
                   "health")  # fmt: skip
        again = Stream(base, PROMPTS[0], MODEL, MAX_TOKENS)
        again.run()
        assert again.done and again.text == reference[PROMPTS[0]], again.error

        # 3. Every pool back to its size, every block free, the ledger clean.
        whole = wait_whole("prefill", 2) + wait_whole("decode", 2)
        live = {s["instance"] for s in whole}
        assert dead_prefill not in live and dead_decode not in live
        _ledger_clean(ray_cluster, live)


def test_disaggregated_tp2_transfers_every_rank_and_survives_a_decode_rank_kill(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    """Disaggregated pools at TP=2 (1 prefill, 2 decode replicas; a tiny Llama with 4
    KV heads, 2 per rank): every request's K/V moves rank r → rank r, the bytes of both
    ranks' head groups; then a rank actor of a decode instance is killed mid-stream."""
    import json

    prompts = [[7, 8, 9, 10, 11 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    ref = [
        o.outputs[0].text for o in LLM(tiny_dirs["llama3"], device="cpu").generate(prompts, params)
    ]
    hf = json.loads((tiny_dirs["llama3"] / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    block_bytes = hf["num_hidden_layers"] * 2 * 16 * hf["num_key_value_heads"] * head_dim * 4
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", tensor_parallel_size=2,
                 mode="disaggregated", prefill_replicas=1, decode_replicas=2,
                 engine={"max_model_len": 256, "block_size": 16},
                 faults={"step_delay_s": 0.02}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        assert len(replica_ids("decode")) == 2
        streams, victim = kill_a_rank_mid_stream("decode", base, prompts, "tiny", 120)
        for s, want in zip(streams, ref, strict=True):
            assert s.error is None and s.done, s.error
            assert s.text == want
        firsts = [(s.kv.get("earlier") or [s.kv])[0] for s in streams]
        for kv in firsts:  # one block of prompt, all 4 KV heads: both ranks' halves
            assert kv["mode"] == "transferred" and kv["transferred_bytes"] == block_bytes, kv
        resumed = [s.kv for s in streams if s.kv.get("mode") == "resumed"]
        assert resumed and all(kv["instance"] != victim for kv in resumed), [s.kv for s in streams]
        whole = wait_whole("prefill", 1) + wait_whole("decode", 2)  # the broken one replaced
        live = {s["instance"] for s in whole}
        assert victim not in live
        _ledger_clean(ray_cluster, live)
