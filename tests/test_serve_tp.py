"""A pool replica that drives a tensor-parallel worker group: the replica holds bundle 0
of its placement group, its rank actor bundle 1; output equals the TP=1 engine's, and a
rank actor killed mid-stream costs no request and changes no token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from engine import LLM, SamplingParams
from tests.factories import serving
from tests.serve_helpers import kill_a_rank_mid_stream, replica_ids, wait_whole


def test_tp2_replicas_serve_the_tp1_tokens_through_a_rank_kill(
    ray_cluster: Any, tiny_dirs: dict[str, Path]
) -> None:
    from ray import serve
    from ray.util import placement_group_table

    prompt = [7, 8, 9, 10, 11]
    ref = (
        LLM(tiny_dirs["llama3"], device="cpu")
        .generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        .outputs[0]
    )
    prompts = [[7, 8, 9, 10, 11 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    want = [
        o.outputs[0].text for o in LLM(tiny_dirs["llama3"], device="cpu").generate(prompts, params)
    ]
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", tensor_parallel_size=2,
                 num_replicas=2, engine={"max_model_len": 256},
                 faults={"step_delay_s": 0.02}) as cfg:  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{cfg.http_port}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                             "ignore_eos": True, "logprobs": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24
        assert r.json()["choices"][0]["text"] == ref.text and ref.text
        # One placement group of two CPU bundles, created by Serve for the replica.
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"
                  and len(g["bundles"]) == 2]  # fmt: skip
        assert groups, placement_group_table()
        stats = serve.get_deployment_handle("engine", app_name="kvserve").stats.remote().result()
        assert stats["tp"] == 2
        # A rank actor killed while every stream is running: the streams of its replica
        # resume on the other one with the same tokens, and Serve rebuilds the broken one.
        base = f"http://127.0.0.1:{cfg.http_port}"
        assert len(replica_ids("engine")) == 2
        streams, victim = kill_a_rank_mid_stream("engine", base, prompts, "tiny", 120)
        for st, text in zip(streams, want, strict=True):
            assert st.error is None and st.done, st.error
            assert st.text == text
        resumed = [st.kv for st in streams if st.kv.get("mode") == "resumed"]
        assert resumed and all(kv["instance"] != victim for kv in resumed), [
            st.kv for st in streams
        ]
        whole = wait_whole("engine", 2)  # every block back; the broken replica replaced
        assert victim not in {w["instance"] for w in whole}


def test_served_tp_bench_gives_one_model_at_every_tp(ray_cluster: Any) -> None:
    """``bench.served_tp`` (issue 25's harness, here on gloo) at TP=1 and 2 on dummy weights:
    the same greedy texts at both sizes (dummy weights are one model, whatever the shard),
    and a rank actor killed mid-stream costs no request and changes no text."""
    import torch

    from bench.router import engine_args
    from bench.served_tp import QUICK, run_served_tp
    from engine.loader import dummy_tensors
    from engine.shapes import make_config

    a, b = (dict(dummy_tensors(make_config("tiny"), 3, torch.device("cpu"), torch.float32))
            for _ in range(2))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import argparse

    kw = engine_args(
        argparse.Namespace(device="cpu", model="tiny", max_model_len=256, concurrency=8)
    )
    result = run_served_tp(kw.pop("model"), kw.pop("device"), [1, 2], QUICK, engine=kw)
    r, kill = result["ratios"], result["raw"]["kill"]
    assert r["same_text_tp2_vs_tp1"] == 1.0, result["raw"]
    assert kill["running_at_kill"] > 0 and kill["rebuilt"], kill
    assert r["kill_finished"] == 1.0 and r["kill_same_text"] == 1.0, kill
    assert result["raw"]["tp2"]["W1"]["ok"] == QUICK.w1_requests
