"""``kvserve plan``: the KV-cache arithmetic of a deployment (bytes per token, weights,
the KV budget, blocks, tokens and sessions per GPU) for a model directory, a GGUF file
or a named shape (``engine.shapes``)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def cmd_plan(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
    from engine.kv_budget import blocks_for, sessions
    from engine.shapes import MODELS, make_config

    if args.model in MODELS:
        hf: Any = make_config(args.model)
    else:
        from transformers import AutoConfig

        from engine.loader import resolve_model

        hf = AutoConfig.from_pretrained(resolve_model(args.model))
    m = ModelConfig.from_hf(hf)
    m.check_tensor_parallel(args.tp)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    kv_bytes = 1 if args.kv_cache_dtype == "fp8" else dtype_bytes
    kv_heads = max(1, m.num_kv_heads // args.tp)  # replicated when tp > kv heads
    per_token = m.kv_bytes_per_token(kv_bytes, kv_heads)
    params = m.num_params
    weights = params * dtype_bytes / args.tp
    budget = args.gpu_memory_gib * 2**30 * args.utilization - weights
    block = per_token * args.block_size
    blocks = max(0, int(budget // block))
    tokens = blocks * args.block_size
    table = Table(title=f"KV plan: {args.model or 'SmolLM2-135M-Instruct'}, TP {args.tp}, "
                        f"{args.gpu_memory_gib:g} GiB GPUs")  # fmt: skip
    table.add_column("quantity")
    table.add_column("per GPU (rank)", justify="right")
    table.add_row("KV bytes per token",
                  f"{m.num_layers} layers × 2 × {kv_heads} kv heads × {m.head_dim} head_dim × "
                  f"{kv_bytes} B = {per_token:,} B")  # fmt: skip
    table.add_row("weights", f"{params / 1e9:.2f} B params × {dtype_bytes} B / {args.tp} = "
                             f"{weights / 2**30:.2f} GiB")  # fmt: skip
    table.add_row("KV budget", f"{args.gpu_memory_gib:g} GiB × {args.utilization} − weights = "
                               f"{max(budget, 0) / 2**30:.2f} GiB")  # fmt: skip
    table.add_row(
        "blocks", f"{blocks:,} of {args.block_size} tokens ({block / 2**20:.2f} MiB each)"
    )
    table.add_row("tokens held", f"{tokens:,}")
    # The scheduler's own arithmetic (engine.kv_budget): whole sessions, each in whole
    # blocks, are what projected admission admits at once.
    table.add_row(f"sessions of {args.context:,} tokens",
                  f"{sessions(blocks, args.block_size, args.context):,} "
                  f"(each {blocks_for(args.context, args.block_size)} blocks)")  # fmt: skip
    console.print(table)
    console.print("[dim]activations and CUDA graphs take a little more; the engine logs its "
                  "exact plan at start-up[/dim]")  # fmt: skip
    return 0
