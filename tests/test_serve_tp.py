"""A pool replica that drives a tensor-parallel worker group: the replica holds bundle 0
of its placement group, its rank actor bundle 1; output equals the TP=1 engine's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from engine import LLM, SamplingParams
from tests.factories import serving


def test_tp2_replica_serves_the_tp1_tokens(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:
    from ray import serve
    from ray.util import placement_group_table

    prompt = [7, 8, 9, 10, 11]
    ref = (
        LLM(tiny_dirs["llama3"], device="cpu")
        .generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        .outputs[0]
    )
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", tensor_parallel_size=2,
                 engine={"max_model_len": 256}) as cfg:  # fmt: skip
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
