"""Load and memory pressure through the served app (CPU, SmolLM2, real Ray and Serve).

- 448 streaming requests at 64 concurrent clients, half through HTTP (SSE) and half
  through gRPC (``GenerateStream``), with ``bench.soak``: no error, no lost request,
  every answer equal to the offline engine's greedy text, every block back and the
  ledger clean afterwards; TTFT and ITL percentiles are printed.
- Offered load needing three times the KV pool completes through preemption, with the
  same outputs as an unpressured run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.soak import books, run_soak
from engine import SamplingParams
from tests.factories import free_port, serving

MODEL = "smol-load"


def test_448_streams_at_64_clients_over_http_and_grpc(
    ray_cluster: Any, smollm2_dir: Path, smollm2_llm: Any
) -> None:
    requests, concurrency, max_tokens, distinct, words = 448, 64, 16, 8, 16
    prompts = loadgen.prompts(distinct, words, seed=0)
    ref = smollm2_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    want = {p: o.outputs[0].text for p, o in zip(prompts, ref, strict=True)}
    grpc_port = free_port()
    with serving(model=str(smollm2_dir), model_name=MODEL, grpc_port=grpc_port,
                 engine={"max_model_len": 512}) as cfg:  # fmt: skip
        res = run_soak(f"http://127.0.0.1:{cfg.http_port}", f"127.0.0.1:{grpc_port}", MODEL,
                       requests, concurrency, max_tokens, distinct, words)  # fmt: skip
        summary = res.summary()
        print("\nload:", {k: summary[k] for k in ("requests", "ok", "wall_s", "output_tok_s",
                                                  "ttft_s", "itl_s", "by_api")})  # fmt: skip
        assert res.errors == []
        assert len(res.records) == requests and all(r.done for r in res.records)
        assert res.by_api == {"http": requests // 2, "grpc": requests // 2}
        for r in res.records:
            assert r.text == want[r.prompt], r.prompt
            assert r.completion_tokens == max_tokens
        found = books(["engine"])
        assert found["whole"], found


def test_three_times_the_kv_pool_completes_through_preemption(
    ray_cluster: Any, smollm2_dir: Path, smollm2_llm: Any
) -> None:
    from ray import serve

    max_tokens, n = 48, 24
    prompts = [f"Story {i}: " + "the river ran past the old stone mill and " * 3 for i in range(n)]
    ref = smollm2_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    need = sum(-(-(len(o.prompt_token_ids) + max_tokens) // 16) for o in ref)
    num_blocks = need // 3  # the offered load needs three pools' worth of blocks
    with serving(model=str(smollm2_dir), model_name=MODEL,
                 engine={"max_model_len": 512, "num_blocks": num_blocks,
                         "kv_admission": "committed"}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"

        def one(prompt: str) -> str:
            r = httpx.post(f"{base}/v1/completions", timeout=600, json={
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})  # fmt: skip
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["text"])

        with ThreadPoolExecutor(n) as pool:
            texts = list(pool.map(one, prompts))
        assert texts == [o.outputs[0].text for o in ref]
        stats = serve.get_deployment_handle("engine", app_name="kvserve").stats.remote().result()
        assert stats["num_blocks"] == num_blocks and need >= 3 * num_blocks
        assert stats["preemptions"] > 0, stats
        assert books(["engine"])["whole"]
