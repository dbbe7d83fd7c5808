"""API processes' links to the engine replicas (``cluster.api``, ``cluster.core``): many
requests share one link per (API process, replica), new requests go to the least loaded
replica (or to the one holding their prompt's prefix), and what comes back per request
is exactly its own tokens."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.api.server import merge
from engine import LLM, SamplingParams
from tests.factories import random_prompts, serving
from tests.serve_helpers import wait_attached, wait_until

MAX_TOKENS = 24


def _stream(url: str, prompt: list[int]) -> tuple[str, int]:
    """A streamed greedy completion's text and its number of chunks."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    text, chunks, usage, kv = "", 0, {}, {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                chunks += bool(chunk["choices"])
                usage = chunk.get("usage") or usage
                kv = chunk.get("kvserve") or kv
    assert usage["completion_tokens"] == MAX_TOKENS
    # The first token's time, split by where it went: each part within the one before.
    t = kv["timing_ms"]
    assert 0 <= t["replica_queue"] <= t["replica_first_delta"] <= t["api_first_delta"], t
    assert 0 < t["api_place"] <= t["api_first_delta"], t
    assert 0 < t["engine_ttft"] <= t["replica_first_delta"] - t["replica_queue"] + 2e-3, t
    return text, chunks


def _instances(ray_cluster: Any, n: int, submitted: int) -> list[dict[str, Any]]:
    """The ledger rows of the ``n`` replicas once they report ``submitted`` requests in
    all and none running or waiting (a report is up to a second old: one sent while the
    last requests were finishing still counts them)."""
    from cluster.placement.ledger import get_ledger

    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in ray_cluster.get(get_ledger().instances.remote())
                if r.get("model") == "tiny"]  # fmt: skip
        idle = all(r.get("running") == 0 and r.get("waiting") == 0 for r in rows)
        if len(rows) == n and sum(r.get("submitted", 0) for r in rows) >= submitted and idle:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"instances did not report: {rows}")


def test_shared_streams_two_replicas(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    prompts = random_prompts(24, 4, 40, vocab=512, seed=7)
    ref = LLM(tiny_dirs["llama3"], device="cpu")
    want = [o.outputs[0].text for o in
            ref.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                 ignore_eos=True))]  # fmt: skip
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", num_replicas=2,
                 engine={"max_model_len": 512}) as cfg:  # fmt: skip
        url = f"http://127.0.0.1:{cfg.http_port}"
        wait_attached(url, 2)
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda p: _stream(url, p), prompts))
        assert [text for text, _ in got] == want
        rows = _instances(ray_cluster, 2, len(prompts))
        # Every request went through a replica's link, both replicas took some (least
        # loaded first), and a link message carried several requests' deltas.
        assert sum(r["submitted"] for r in rows) == len(prompts)
        assert all(r["submitted"] > 0 for r in rows), rows
        items = sum(r["link_messages"] for r in rows)
        deltas = sum(r["link_deltas"] for r in rows)
        assert deltas >= len(prompts) and items < deltas, (items, deltas)
        # Everything is back: no request left running, every block free.
        for r in rows:
            assert r["running"] == 0 and r["waiting"] == 0
        # Prefix affinity: 6 concurrent requests sharing 5 blocks of prompt all go where
        # those blocks are cached (least-loaded alone would split them 3/3); the
        # replicas' hashes reach the API processes on their links about once a second.
        # An API process loads the engine's tokenizer once attached, in the background.
        wait_until(lambda: httpx.get(f"{url}/health", timeout=10).json().get("affinity") == "on",
                   60, "the API's prefix affinity")  # fmt: skip
        shared = random_prompts(1, 80, 80, vocab=512, seed=11)[0]
        first = _complete(url, [*shared, 1])
        assert first["kvserve"]["cached_tokens"] == 0
        time.sleep(3)
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda i: _complete(url, [*shared, i]), range(2, 8)))
        for out in outs:
            assert out["kvserve"]["instance"] == first["kvserve"]["instance"], out["kvserve"]
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 80, out["usage"]


def _complete(url: str, prompt: list[int]) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_merge_joins_consecutive_deltas() -> None:
    a = {"request_id": "r", "finished": False, "prompt_tokens": 3, "cached_tokens": 0,
         "choices": [{"index": 0, "text": "he", "token_ids": [1], "logprobs": None,
                      "finish_reason": None}]}  # fmt: skip
    b = {"request_id": "r", "finished": True, "prompt_tokens": 3, "cached_tokens": 0,
         "choices": [{"index": 0, "text": "llo", "token_ids": [2, 3], "logprobs": None,
                      "finish_reason": "length"},
                     {"index": 1, "text": "x", "token_ids": [9], "logprobs": None,
                      "finish_reason": "length"}]}  # fmt: skip
    m = merge(a, b)
    assert m["finished"] is True
    assert m["choices"][0] == {"index": 0, "text": "hello", "token_ids": [1, 2, 3],
                               "logprobs": None, "finish_reason": "length"}  # fmt: skip
    assert m["choices"][1]["text"] == "x"
    assert a["choices"][0]["text"] == "he"  # inputs untouched
    err = {"request_id": "r", "error": "bad"}
    assert merge(a, err) is err


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_a_conversations_second_turn_finds_its_prefix(
    ray_cluster: Any, tiny_dirs: dict[str, Path], mode: str
) -> None:
    """Two API replicas over two engine replicas (colocated, or two decode replicas with
    a prefill pool): the second turn of each of 4 conversations goes to the replica
    that holds its first turn's blocks, chosen by the placement policy
    (``GlobalBlockManager.place`` over the links' prefix hashes), and is served from
    that prefix cache (``cached_tokens`` > 0)."""
    pools = ({"num_replicas": 2} if mode == "colocated"
             else {"mode": "disaggregated", "decode_replicas": 2, "prefill_replicas": 1})  # fmt: skip
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", api_replicas=2,
                 engine={"max_model_len": 512}, **pools) as cfg:  # fmt: skip
        url = f"http://127.0.0.1:{cfg.http_port}"
        wait_until(lambda: all(httpx.get(f"{url}/health", timeout=10).json().get("affinity")
                               == "on" for _ in range(6)), 60, "prefix affinity in both APIs")  # fmt: skip
        firsts, chats = [], []
        for i in range(4):
            system = " ".join(f"w{(i * 37 + j) % 500 + 5}" for j in range(48))
            chat = [{"role": "system", "content": system}, {"role": "user", "content": "w9 w8"}]
            out = _chat(url, chat)
            chats.append([*chat, {"role": "assistant", "content": out["text"]},
                          {"role": "user", "content": "w7 w6 w5"}])  # fmt: skip
            firsts.append(out)
        time.sleep(2.5)  # the cores' prefix hashes reach every API process (each second)
        for first, chat in zip(firsts, chats, strict=True):
            second = _chat(url, chat)
            assert second["instance"] == first["instance"], (first, second)
            assert second["cached_tokens"] >= 48, second


def _chat(url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    return {"text": got["choices"][0]["message"]["content"],
            "instance": got["kvserve"]["instance"],
            "cached_tokens": got["usage"]["prompt_tokens_details"]["cached_tokens"]}  # fmt: skip
