"""Disaggregated prefill and decode pools through the HTTP API (CPU, real Ray, gloo).

One prefill replica and one decode replica of SmolLM2: every request's prompt is
computed by the prefill replica, its K/V moves over a gloo link into blocks the decode
replica reserved, and the decode replica continues. The text must equal the offline
engine's greedy text; nothing may leak (blocks, reservations); a prefill replica killed
mid-transfer must not lose the request (the decode side recomputes)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import SamplingParams
from tests.factories import serving

MODEL = "smol-disagg"
MAX_TOKENS = 16
BLOCK = 16  # the engine's default block size
BASE = "The history of the printing press begins in the fifteenth century, when "
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    BASE * 3,
    BASE * 9 + "In summary,",
    "1, 2, 3, 4, 5,",
    BASE * 6,
]


@pytest.fixture(scope="module")
def reference(smollm2_llm: Any) -> list[str]:
    outs = smollm2_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].text for o in outs]


def _complete(base: str, prompt: str, stream: bool = False) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    if not stream:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json())
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    text, usage_chunk = "", {}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            chunk = json.loads(line[6:])
            text += "".join(c["text"] for c in chunk["choices"])
            if chunk.get("usage"):
                usage_chunk = chunk
    return {"choices": [{"text": text}], "kvserve": usage_chunk["kvserve"]}


def _moved(out: dict[str, Any]) -> int:
    """The blocks a transferred request's prompt took on the decode side that were not
    prefix hits there: what its prefill replica sent."""
    n, hit = out["usage"]["prompt_tokens"], out["kvserve"]["cached_tokens"]
    return -(-n // BLOCK) - hit // BLOCK


def _stats(name: str) -> dict[str, Any]:
    from ray import serve

    return dict(serve.get_deployment_handle(name, app_name="kvserve").stats.remote().result())


def _pools_whole(timeout: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        pools = {name: _stats(name) for name in ("prefill", "decode")}
        if all(s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["num_blocks"]
               for s in pools.values()):  # fmt: skip
            return pools
        if time.monotonic() > deadline:
            raise AssertionError(f"pools not whole: {pools}")
        time.sleep(0.2)


def _ledger_agrees(ray_cluster: Any, pools: dict[str, dict[str, Any]]) -> None:
    """The ledger's rows for these instances equal their own counts; nothing reserved."""
    from cluster.placement.ledger import get_ledger

    ids = {s["instance"]: s for s in pools.values()}
    deadline = time.monotonic() + 20
    while True:
        rows = {r["instance_id"]: r for r in ray_cluster.get(get_ledger().instances.remote())}
        totals = ray_cluster.get(get_ledger().totals.remote())
        mine = [rows.get(i) for i in ids]
        ok = all(r is not None and r["free_blocks"] == ids[r["instance_id"]]["free_blocks"]
                 for r in mine)  # fmt: skip
        if (ok and totals["reserved"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ok, (mine, ids)
    assert {rows[i]["role"] for i in ids} == {"prefill", "decode"}
    assert totals["reserved"] == 0 and totals["reservations"] == 0
    assert totals["capacity"] == sum(r["num_blocks"] for r in rows.values())


def test_disaggregated_equals_colocated_over_http(
    ray_cluster: Any, smollm2_dir: Path, reference: list[str]
) -> None:
    """Through the API processes, which place requests on the decode pool."""
    with serving(model=str(smollm2_dir), model_name=MODEL, mode="disaggregated",
                 engine={"max_model_len": 1024}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent, varied lengths
            outs = list(pool.map(lambda p: _complete(base, p), PROMPTS))
        assert [o["choices"][0]["text"] for o in outs] == reference
        for o in outs:
            kv = o["kvserve"]
            assert kv["mode"] == "transferred", kv
            assert kv["transferred_bytes"] > 0 and kv["transfer_seconds"] > 0
            assert kv["prefill_instance"] and kv["prefill_instance"] != kv["instance"]
        # Whole blocks of every layer move, and only those the decode replica had not
        # cached (the prompts share a prefix; one that ran earlier left its blocks).
        per_block = {o["kvserve"]["transferred_bytes"] / _moved(o) for o in outs}
        assert len(per_block) == 1, per_block
        assert _moved(outs[3]) > _moved(outs[0])
        # Again, streamed: the decode replica has the prompt cached but its last block.
        streamed = _complete(base, PROMPTS[3], stream=True)
        assert streamed["choices"][0]["text"] == reference[3]
        kv = streamed["kvserve"]
        assert kv["mode"] == "transferred"
        n = outs[3]["usage"]["prompt_tokens"]
        assert kv["cached_tokens"] == (n - 1) // BLOCK * BLOCK > 0
        assert kv["transferred_bytes"] == per_block.pop() * (-(-n // BLOCK) - (n - 1) // BLOCK)
        # A client that leaves mid-stream: its blocks come back on both sides.
        body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 200, "temperature": 0,
                "stream": True, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        pools = _pools_whole()
        assert pools["decode"]["kv_bytes_received"] == pools["prefill"]["kv_bytes_sent"] > 0
        assert pools["decode"]["kv_link_failures"] == 0
        _ledger_agrees(ray_cluster, pools)
        # The prefix-cache reset reaches both pools; the prompt then moves whole again.
        r = httpx.post(f"{base}/reset_prefix_cache", timeout=60)
        assert r.status_code == 200, r.text
        forgotten = r.json()["instances"]
        assert forgotten[pools["decode"]["instance"]] > 0, forgotten
        assert forgotten[pools["prefill"]["instance"]] > 0, forgotten
        again = _complete(base, PROMPTS[3])
        assert again["choices"][0]["text"] == reference[3]
        assert again["kvserve"]["cached_tokens"] == 0 and _moved(again) == -(-n // BLOCK)


def test_prefill_killed_mid_transfer_falls_back(
    ray_cluster: Any, smollm2_dir: Path, reference: list[str]
) -> None:
    """The prefill replica waits 3 s between announcing a transfer and sending it; it is
    killed in that window, while the decode replica waits in its receive. The request
    still completes with the reference text (recomputed on the decode replica), and a
    later request goes through the replacement prefill replica over a new link."""
    import ray

    with serving(model=str(smollm2_dir), model_name=MODEL, mode="disaggregated",
                 engine={"max_model_len": 1024},
                 faults={"send_delay_s": 3.0}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        victim = _stats("prefill")["instance"]
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                     if "prefill" in a["name"] and victim in a["name"])  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(_complete, base, PROMPTS[2])
            time.sleep(1.5)  # prefill done (ms), the sender sleeps, the receiver waits
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
            out = fut.result(timeout=60)
        assert out["choices"][0]["text"] == reference[2]
        assert out["kvserve"]["mode"] == "recomputed", out["kvserve"]  # no other prefill
        assert out["kvserve"]["prefill_failures"] == [victim], out["kvserve"]
        decode = _pools_whole(timeout=60)["decode"]
        assert decode["kv_link_failures"] >= 1
        # Serve replaces the prefill replica; the next request is transferred again.
        deadline = time.monotonic() + 90
        while True:
            again = _complete(base, PROMPTS[0])
            if again["kvserve"]["mode"] == "transferred" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again["choices"][0]["text"] == reference[0]
        assert again["kvserve"]["mode"] == "transferred", again["kvserve"]
        assert again["kvserve"]["prefill_instance"] != victim
        pools = _pools_whole()
        _ledger_agrees(ray_cluster, pools)


def test_failing_pair_is_quarantined_then_rebuilt(
    ray_cluster: Any, smollm2_dir: Path, reference: list[str]
) -> None:
    """The prefill replica fails its first 3 prefills (after offering the link). The decode
    replica recomputes each of them, quarantines the pair after the third, runs the next
    request locally without touching the pair, and once the quarantine (5 s) is over it
    closes the old link and the next transfer goes over a new one."""
    with serving(model=str(smollm2_dir), model_name=MODEL, mode="disaggregated",
                 engine={"max_model_len": 1024},
                 faults={"fail_prefills": 3},
                 pd={"pair_max_failures": 3, "pair_quarantine_s": 5.0}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        modes = []
        for i in range(4):
            out = _complete(base, PROMPTS[i])
            assert out["choices"][0]["text"] == reference[i]
            modes.append(out["kvserve"]["mode"])
        assert modes == ["recomputed"] * 3 + ["local"], modes
        assert "quarantined" in out["kvserve"]["reason"]
        decode = _stats("decode")
        assert decode["pair_quarantines"] == 1
        assert decode["kv_link_failures"] == 1  # the pair's link, closed on quarantine
        time.sleep(5.5)
        out = _complete(base, PROMPTS[4])
        assert out["choices"][0]["text"] == reference[4]
        assert out["kvserve"]["mode"] == "transferred", out["kvserve"]
        pools = _pools_whole()
        assert pools["decode"]["pairs"] == {}  # the success cleared the record
        assert pools["decode"]["kv_bytes_received"] == pools["prefill"]["kv_bytes_sent"] > 0
        _ledger_agrees(ray_cluster, pools)


def test_decode_side_prefix_hits_and_conditional_local_prefill(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    """1 prefill + 2 decode replicas of a tiny model; a decode replica computes a prompt
    itself when at most 20 tokens of it are not in its prefix cache. A short prompt runs
    locally; a long one is transferred; its continuation (a next turn: the same prompt
    and 5 more tokens) goes to the decode replica that holds the first turn's blocks
    (prefix affinity on the decode pool) and runs there locally on 96 cached tokens, with
    no prefill call. Every text equals the offline engine's greedy text."""
    from engine import LLM
    from tests.factories import random_prompts
    from tests.serve_helpers import wait_until

    model = tiny_dirs["llama3"]
    short = random_prompts(1, 10, 10, 512, seed=3)[0]
    first = random_prompts(1, 100, 100, 512, seed=5)[0]
    turn2 = [*first, 7, 8, 9, 10, 11]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM(model, device="cpu").generate(
        [short, first, turn2], greedy)]  # fmt: skip

    def complete(base: str, prompt: list[int]) -> dict[str, Any]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json())

    with serving(model=str(model), model_name="tiny", mode="disaggregated", decode_replicas=2,
                 engine={"max_model_len": 512},
                 pd={"local_prefill_tokens": 20}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json().get("affinity")
                   == "on", 60, "the router's prefix affinity")  # fmt: skip
        outs = [complete(base, short), complete(base, first)]
        time.sleep(3)  # the decode replicas report their cached blocks about once a second
        outs.append(complete(base, turn2))
        assert [o["choices"][0]["text"] for o in outs] == want
        kv = [o["kvserve"] for o in outs]
        assert kv[0]["mode"] == "local" and "transferred_bytes" not in kv[0], kv[0]
        assert kv[1]["mode"] == "transferred" and kv[1]["transferred_bytes"] > 0, kv[1]
        assert kv[2]["mode"] == "local" and kv[2]["cached_tokens"] == 96, kv[2]
        assert kv[2]["instance"] == kv[1]["instance"], kv
        # One prefill call in all: only the long first turn's K/V moved.
        pools = _pools_whole()
        assert pools["prefill"]["kv_bytes_sent"] == kv[1]["transferred_bytes"]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1)])
def test_disaggregated_between_tp_sizes_gives_the_offline_tokens(
    ray_cluster: Any, tiny_dirs: dict[str, Path], prefill_tp: int, decode_tp: int
) -> None:
    """A prefill pool of one TP and a decode pool of another (a tiny Llama with 4 KV
    heads): the link re-slices the heads (1 → 2: the prefill rank sends each decode rank
    its half; 2 → 1: the decode rank takes a half from each prefill rank), so every head
    of every prompt block arrives, and the HTTP API answers the offline engine's greedy
    text. The pools are whole afterwards."""
    import json

    from engine import LLM

    prompts = [[7, 8, 9, 10, 11 + i] * (1 + 4 * i) for i in range(4)]  # 1 to 4 blocks
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(tiny_dirs["llama3"], device="cpu") as llm:
        ref = [o.outputs[0].text for o in llm.generate(prompts, params)]
    hf = json.loads((tiny_dirs["llama3"] / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    block_bytes = hf["num_hidden_layers"] * 2 * BLOCK * hf["num_key_value_heads"] * head_dim * 4
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", mode="disaggregated",
                 prefill_tp=prefill_tp, decode_tp=decode_tp,
                 engine={"max_model_len": 256}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"

        def complete(prompt: list[int]) -> dict[str, Any]:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return dict(r.json())

        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(complete, prompts))
        assert [o["choices"][0]["text"] for o in outs] == ref
        for out in outs:
            kv = out["kvserve"]
            assert kv["mode"] == "transferred", kv
            assert kv["transferred_bytes"] == _moved(out) * block_bytes, kv  # every head
        pools = _pools_whole()
        assert pools["prefill"]["tp"] == prefill_tp and pools["decode"]["tp"] == decode_tp
        assert pools["decode"]["kv_bytes_received"] == pools["prefill"]["kv_bytes_sent"] > 0
        assert pools["decode"]["kv_link_failures"] == 0
