"""Does clearing the prefix cache change the model? One long prompt through the served
path (local Ray, HTTP): cold, again (its prefix cached), after ``POST
/reset_prefix_cache``, and again. Per request: TTFT (first streamed token), cached
prompt tokens, and the greedy text, which must be the same all four times.

``python -m bench.reset [--device cpu] [--model DIR] [--reps 3]`` writes the record
``RESET`` (``bench/results``; the report in ``docs/benchmarks.md``). TTFT is the
median of ``--reps`` rounds of the four requests, each round on a new prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import httpx
import torch

from bench import report
from bench.common import RESULTS_DIR, environment, write_result
from bench.router import wait_ready
from cluster.netbind import free_port

PHASES = ("cold", "cached", "after_reset", "cached_again")
FILLER = (
    "The keys and values of every token are computed once and kept in fixed-size blocks. "
    "Requests that share a prefix share its blocks; a block nobody holds stays cached "
    "until its memory is needed. "
)


def _prompt(i: int, words: int) -> str:
    return f"Document {i}. " + (FILLER * (words // len(FILLER.split()) + 1)) + "Summarise it:"


def _stream(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: TTFT (s), cached prompt tokens, text."""
    import json

    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, text = None, ""
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", ()):
                if c["text"] and ttft is None:
                    ttft = time.perf_counter() - t0
                text += c["text"]
            usage = chunk.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ttft_s": ttft, "cached_tokens": cached, "prompt_tokens": usage.get("prompt_tokens"),
            "text": text}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reset", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="HF directory (default: SmolLM2)")
    p.add_argument("--words", type=int, default=600, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from cluster.app import run
    from cluster.config import ServeConfig

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    cfg = ServeConfig(model=args.model, model_name="bench", device=args.device, http_port=port,
                      grpc_port=0, engine={"max_model_len": 2048})  # fmt: skip
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        run(cfg)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        _stream(url, _prompt(-1, 50), 2)  # warm-up, its own prompt
        for i in range(args.reps):
            prompt = _prompt(i, args.words)
            got: dict[str, dict[str, Any]] = {}
            for phase in PHASES:
                if phase == "after_reset":
                    r = httpx.post(f"{url}/reset_prefix_cache", timeout=60)
                    r.raise_for_status()
                got[phase] = _stream(url, prompt, args.max_tokens)
            rounds.append(got)
    finally:
        serve.shutdown()
        ray.shutdown()
    same_text = all(len({g[ph]["text"] for ph in PHASES}) == 1 for g in rounds)
    ttft = {ph: statistics.median(g[ph]["ttft_s"] for g in rounds) for ph in PHASES}
    cached = {ph: [g[ph]["cached_tokens"] for g in rounds] for ph in PHASES}
    config = {"words": args.words, "max_tokens": args.max_tokens, "reps": args.reps,
              "model": args.model or "SmolLM2-135M-Instruct"}  # fmt: skip
    per_round = [{ph: {k: v for k, v in g[ph].items() if k != "text"} for ph in PHASES}
                 for g in rounds]  # fmt: skip
    raw = {"rounds": per_round, "ttft_median_s": ttft, "cached_tokens": cached,
           "same_text": same_text, "prompt_tokens": rounds[0]["cold"]["prompt_tokens"]}  # fmt: skip
    notes = {
        "ttft_s": "first streamed token, client side, through HTTP",
        "cached_tokens": "usage.prompt_tokens_details.cached_tokens of each request",
        "same_text": "1: the greedy text was identical in all four phases of every round",
    }
    ratios = {
        "ttft_after_reset_over_cached": ttft["after_reset"] / ttft["cached"],
        "ttft_cached_again_over_cached": ttft["cached_again"] / ttft["cached"],
        "same_text": float(same_text),
    }
    result = {"peer": "none: the same server before and after the reset", "config": config,
              "raw": raw, "ratios": ratios, "notes": notes}  # fmt: skip
    device = torch.device(args.device)
    path = write_result(RESULTS_DIR, "cpu" if device.type == "cpu" else "gpu", "RESET",
                        environment(device), {}, result)  # fmt: skip
    report.write_report(RESULTS_DIR, report.DOCS_PATH)
    print(f"TTFT median (s): {ttft}\ncached tokens: {cached}\nsame text: {same_text}\n-> {path}")
    return 0 if same_text else 1


if __name__ == "__main__":
    sys.exit(main())
