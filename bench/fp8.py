"""FP8 KV cache: greedy agreement with the bf16 cache over 64 SmolLM2 chat prompts, and
the capacity gain at the same memory budget.

``python -m bench.fp8`` runs the model in bfloat16 on the CPU twice, once with a bf16
cache and once with an e4m3 cache (per-layer scales 1.0), and writes
``bench/results/<date>-<device>-FP8.json``. Agreement is reported three ways: outputs
identical over all tokens, the mean length of the common prefix, and the share of
tokens before the first divergence.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch

from bench.common import common_prefix, environment, write_result
from bench.report import write_report
from engine import LLM, SamplingParams

TOPICS = ["the moon", "rivers", "bread", "volcanoes", "bees", "chess", "rain", "glass",
          "trains", "coffee", "maps", "whales", "clocks", "salt", "kites", "libraries"]  # fmt: skip
FORMS = [
    "What is {}?",
    "Tell me one fact about {}.",
    "Why do people like {}?",
    "Describe {} in a sentence.",
]
RESULTS = Path(__file__).parent / "results"


def prompts(llm: LLM) -> list[str]:
    return [
        llm.engine.apply_chat_template([{"role": "user", "content": f.format(t)}])
        for t, f in itertools.product(TOPICS, FORMS)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budget = 256 * 2**20
    kw: dict[str, Any] = dict(
        device="cpu", dtype="bfloat16", max_model_len=1024, cpu_kv_cache_bytes=budget
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    runs: dict[str, Any] = {}
    for name in ("bf16", "fp8"):
        llm = LLM(None, kv_cache_dtype="fp8" if name == "fp8" else "auto", **kw)
        ps = prompts(llm)
        outs = llm.generate(ps, params)
        runs[name] = {
            "blocks": llm.engine.runner.num_blocks,
            "tokens": [o.outputs[0].token_ids for o in outs],
        }
        del llm
    a, b = runs["bf16"]["tokens"], runs["fp8"]["tokens"]
    prefixes = [common_prefix(x, y) for x, y in zip(a, b, strict=True)]
    n = len(a)
    raw = {
        "num_prompts": n,
        "blocks_bf16": runs["bf16"]["blocks"],
        "blocks_fp8": runs["fp8"]["blocks"],
        "identical_outputs": sum(x == y for x, y in zip(a, b, strict=True)),
        "mean_common_prefix": sum(prefixes) / n,
        "common_prefixes": prefixes,
    }
    ratios = {
        "capacity_fp8_over_bf16": raw["blocks_fp8"] / raw["blocks_bf16"],
        "identical_share": raw["identical_outputs"] / n,
        "tokens_before_divergence_share": sum(prefixes) / (n * args.max_tokens),
    }
    config = {
        "model": "smollm2",
        "dtype": "bfloat16",
        "max_tokens": args.max_tokens,
        "budget_bytes": budget,
    }
    result = {"config": config, "raw": raw, "ratios": ratios, "peer": "bf16 KV cache",
              "notes": "per-layer scales calibrated at start-up (2 × max|x| / 448 over a fixed text); CPU reference path"}  # fmt: skip
    path = write_result(args.out, "cpu", "FP8", environment(torch.device("cpu")), {}, result)
    print(path)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if args.out == RESULTS:
        write_report()


if __name__ == "__main__":
    main()
