"""The GPU suite: W1-W5, W5-paging, W9, W10 on ``llama3-8b-shape`` (random bf16 weights), ours beside HF.

``python -m bench.gpu [--workloads W1,...] [--quick] [--out DIR]`` writes a synthetic
model directory (config + word-level tokenizer, no weights), measures the ceilings
(CUDA events), builds the HF peer, runs each workload (ours, then the peer; memory
plan in ``bench/gpu_env.py``), writes one record per workload and regenerates the
report. Results go to ``bench/results/`` and the report to ``docs/benchmarks.md``;
with ``--out DIR`` both go under DIR (copy the JSON back into ``bench/results/`` and run
``python -m bench.report``). ``--quick`` is a smoke test in seconds: the 8B shape with
2 layers, tiny sizes, results in a temporary directory unless ``--out`` is given, its
device slug marked with the model name so it never passes for a real run.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.common import RESULTS_DIR, Sizes, environment, write_result
from bench.gpu_env import GPUEnv, Logger, gpu_ceilings
from bench.gpu_prefill_capacity import (
    PagingConfig,
    W4Config,
    W5Config,
    run_w4,
    run_w5,
    run_w5_paging,
    run_w10,
)
from bench.gpu_sharegpt import W9Config, run_w9
from bench.gpu_workloads import W1Config, W2Config, W3Config, run_w1, run_w2, run_w3
from bench.multiturn import W10Config
from bench.report import fmt
from bench.synthetic import write_model_dir
from engine.shapes import MODELS, make_config

SUITE = "gpu"
FULL_MODEL = "llama3-8b-shape"
QUICK_MODEL = "llama3-8b-shape-2l"
# W2 runs first: its batch-1 latency is measured before other work has run in the process
# (the same engine is ~7% slower after W1's; the cause is not known).
RUNNERS: dict[str, Any] = {"W2": run_w2, "W1": run_w1, "W3": run_w3, "W4": run_w4, "W9": run_w9,
                           "W5": run_w5, "W5-paging": run_w5_paging, "W10": run_w10}  # fmt: skip
PEERLESS = {"W5", "W5-paging", "W10"}


FULL = Sizes(
    configs={"W1": W1Config(), "W2": W2Config(), "W3": W3Config(), "W4": W4Config(),
             "W5": W5Config(), "W9": W9Config(), "W5-paging": PagingConfig(),
             "W10": W10Config(conversations=64, max_answer=512, rate=16.0, max_model_len=4096,
                              max_num_seqs=128, control=True)},
    copy_bytes=2 * 1024**3,
    matmul_n=8192,
)  # fmt: skip
QUICK = Sizes(
    configs={
        "W1": W1Config(num_requests=16, prompt_len_min=16, prompt_len_max=128, output_len=16,
                       max_num_seqs=16, max_num_batched_tokens=1024),
        "W2": W2Config(prompt_len=32, output_len=32),
        "W3": W3Config(prompt_len=256, output_len=32, max_model_len=1024, cut_output_len=8),
        "W4": W4Config(prompt_len=512, reps=2),
        "W5": W5Config(prompt_len=64, output_len=16, num_blocks=64, max_num_seqs=64, max_s=30.0,
                       max_model_len=128),
        "W9": W9Config(num_requests=24, peer_requests=8, max_num_seqs=16),
        "W5-paging": PagingConfig(num_requests=64, num_blocks=512),
        "W10": W10Config(conversations=8, max_turns=3, max_answer=16, rate=20.0,
                         max_model_len=1024),
    },
    copy_bytes=256 * 1024**2,
    matmul_n=4096,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    p.add_argument(
        "--workloads",
        default=",".join(RUNNERS),
        help="comma-separated subset of W1-W5, W5-paging, W9, W10",
    )
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_MODEL}, tiny sizes")
    p.add_argument("--out", type=Path, help="write results and the report under DIR")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an engine argument of every kvserve engine (e.g. kv_cache_dtype=fp8)",
    )
    p.add_argument(
        "--tag", default="", help="suffix of the workload names in the records (e.g. fp8)"
    )
    p.add_argument("--model", choices=sorted(MODELS),
                   help=f"default {FULL_MODEL} ({QUICK_MODEL} with --quick)")  # fmt: skip
    p.add_argument("--no-peer", action="store_true",
                   help="time ours only (a before/after run beside a full one)")  # fmt: skip
    p.add_argument("--device", default="cuda", help="default cuda ('cpu' runs the logic only)")
    p.add_argument("--deadline", type=float, default=540.0,
                   help="seconds; a workload not started by then is skipped (default 540)")  # fmt: skip
    args = p.parse_args(argv)
    names = {w.upper(): w for w in RUNNERS}  # "w5-paging" names "W5-paging"
    asked = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
    wanted = {names.get(w, w) for w in asked}
    unknown = wanted - set(RUNNERS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(RUNNERS)}")
    args.workloads = [
        w for w in RUNNERS if w in wanted
    ]  # the peerless ones (they drop the peer) run last
    args.model = args.model or (QUICK_MODEL if args.quick else FULL_MODEL)
    return args


def summary(records: dict[str, dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("workload", "ratio", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for wl, res in records.items():
        for name, value in res["ratios"].items():
            table.add_row(wl, name, fmt(value))
        if "peer_error" in res:
            table.add_row(wl, "peer_error", str(res["peer_error"])[:60])
    return table


def _engine_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed as a Python literal where it is one (True, 0.5, ...)."""
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    log = Logger()
    warnings.filterwarnings("ignore", module="transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu to run the logic on a CPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="kvserve-gpu-bench-")) if args.quick else RESULTS_DIR
    )
    doc = report.DOCS_PATH if out_dir == RESULTS_DIR else out_dir / "benchmarks.md"
    env_rec = environment(device)
    if args.model != FULL_MODEL:  # never filed beside a real run
        env_rec["device"]["slug"] += f"-{args.model}"
        env_rec["device"]["name"] += f" ({args.model})"
    log(f"{env_rec['device']['name']} x{env_rec['device']['count']}; model {args.model}; "
        f"workloads {','.join(args.workloads)}; results -> {out_dir}")  # fmt: skip
    model_dir = Path(tempfile.mkdtemp(prefix="kvserve-synth-"))
    config = make_config(args.model)
    write_model_dir(config, model_dir)
    ceilings = gpu_ceilings(device, dtype, sizes.copy_bytes, sizes.matmul_n)
    log(f"ceilings: copy {fmt(ceilings['copy_bytes_per_s'] / 1e9)} GB/s (read + write), "
        f"matmul {fmt(ceilings['matmul_flop_per_s'] / 1e12)} TFLOP/s")  # fmt: skip
    env = GPUEnv(device, dtype, model_dir, config, ceilings, log)
    env.overrides = dict(_engine_arg(a) for a in args.engine_arg)
    env.with_peer = not args.no_peer
    records: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    try:
        if env.with_peer and any(w not in PEERLESS for w in args.workloads):
            env.peer()
        for wl in args.workloads:
            if log.elapsed > args.deadline:
                log(f"{wl} skipped: past the {args.deadline:.0f} s deadline")
                failed.append(wl)
                continue
            log(f"{wl} start")
            try:
                result = RUNNERS[wl](env, sizes.configs[wl])
            except Exception:  # one workload's failure must not lose the rest
                log(f"{wl} FAILED:\n{traceback.format_exc()}")
                failed.append(wl)
                env.free()
                continue
            env.free()
            result["config"] = {"model": args.model, **asdict(sizes.configs[wl]), **env.overrides}
            name = f"{wl}-{args.tag}" if args.tag else wl
            path = write_result(out_dir, SUITE, name, env_rec, ceilings, result)
            records[wl] = result
            log(f"{wl} done -> {path}")
    finally:
        env.drop_peer()
        shutil.rmtree(model_dir, ignore_errors=True)
    if records:
        log(f"report -> {report.write_report(out_dir, doc)}")
    from rich.console import Console

    Console().print(summary(records, f"kvserve GPU benchmark ({args.model}): ratios, same run"))
    if failed:
        log(f"not recorded: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
