"""The CPU suite: W1, W2, W3 on SmolLM2-135M (float32), ours beside HF transformers.

``python -m bench.cpu [--workloads W1,W2,W3] [--quick]`` loads each model once,
measures the ceilings, warms both engines up, runs the workloads, writes one record
per workload to ``bench/results/`` and regenerates ``docs/benchmarks.md``. ``--quick``
is a smoke test: tiny sizes, records and report in a temporary directory, ``docs/``
untouched. Threads are torch's default.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench import report
from bench.common import (
    RESULTS_DIR,
    ModelFacts,
    Sizes,
    environment,
    measure_ceilings,
    write_result,
)
from bench.report import fmt
from bench.workloads import WORKLOADS, Context, W1Config, W2Config, W3Config, warm_up
from engine import LLM
from engine.loader import resolve_model

SUITE = "cpu"
DEVICE = torch.device("cpu")
DTYPE = torch.float32


FULL = Sizes(
    configs={"W1": W1Config(), "W2": W2Config(), "W3": W3Config()},
    copy_bytes=256 * 1024**2,
    matmul_n=2048,
)
QUICK = Sizes(
    configs={
        "W1": W1Config(
            num_requests=4, prompt_len_min=16, prompt_len_max=48, output_len=8, peer_batch_size=4
        ),
        "W2": W2Config(prompt_len=32, output_len=8),
        "W3": W3Config(prompt_len=64, output_len=8, max_model_len=256),
    },
    copy_bytes=32 * 1024**2,
    matmul_n=512,
)


def log(console: Console, msg: str, t0: float) -> None:
    console.print(f"[dim]{time.perf_counter() - t0:7.1f}s[/dim] {msg}", soft_wrap=True)


def load_context(console: Console, ceilings: dict[str, Any], t0: float) -> Context:
    """Loads our engine and the HF model (once each) on the default model."""
    from transformers import AutoModelForCausalLM

    def make_ours(**engine_args: Any) -> LLM:
        return LLM(model=None, device="cpu", dtype="float32", **engine_args)

    ours = make_ours()
    log(console, "loaded kvserve", t0)
    peer: Any = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=DTYPE)
    peer.to(DEVICE).eval()
    log(console, f"loaded HF ({peer.config._attn_implementation} attention)", t0)
    facts = ModelFacts.from_hf(peer, dtype_bytes=DTYPE.itemsize)
    ours_kv = ours.engine.model_config.kv_bytes_per_token(DTYPE.itemsize)
    if ours_kv != facts.kv_bytes_per_token:
        raise RuntimeError(
            f"KV bytes/token disagree: ours {ours_kv}, HF {facts.kv_bytes_per_token}"
        )
    return Context(DEVICE, ours, peer, facts, ceilings, make_ours, int(ours.tokenizer.eos_token_id))


def summary(records: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="kvserve CPU benchmark: ratios (same run)")
    table.add_column("workload")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for wl, res in records.items():
        for name, value in res["ratios"].items():
            table.add_row(wl, name, fmt(value))
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.cpu", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    p.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W3")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, results to a temp dir, docs/ untouched"
    )
    args = p.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in FULL.configs]
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(FULL.configs)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    console = Console()
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", module="transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    out_dir = Path(tempfile.mkdtemp(prefix="kvserve-bench-")) if args.quick else RESULTS_DIR
    env = environment(DEVICE)
    console.print(f"device: {env['device']['name']} ({env['device']['count']} cores, "
                  f"{torch.get_num_threads()} torch threads); results: {out_dir}", soft_wrap=True)  # fmt: skip
    ceilings = measure_ceilings(DEVICE, DTYPE, sizes.copy_bytes, sizes.matmul_n)
    log(console, f"ceilings: copy {fmt(ceilings['copy_bytes_per_s'] / 1e9)} GB/s, "
                 f"matmul {fmt(ceilings['matmul_flop_per_s'] / 1e9)} GFLOP/s", t0)  # fmt: skip
    ctx = load_context(console, ceilings, t0)
    warm_up(ctx)
    log(console, "warmed up", t0)
    records: dict[str, dict[str, Any]] = {}
    for wl in args.workloads:
        ctx.ours.engine.reset_prefix_cache()  # no workload is flattered by an earlier one
        result = WORKLOADS[wl](ctx, sizes.configs[wl])
        path = write_result(out_dir, SUITE, wl, env, ceilings, result)
        records[wl] = result
        log(console, f"{wl} done -> {path}", t0)
    doc = report.write_report(
        out_dir, out_dir / "benchmarks.md" if args.quick else report.DOCS_PATH
    )
    log(console, f"report -> {doc}", t0)
    console.print(summary(records))


if __name__ == "__main__":
    main()
