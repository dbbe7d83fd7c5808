"""The ``kvserve`` command line.

- ``kvserve serve``: the Serve application (embedded default: a local Ray, CPU or GPU
  as found, SmolLM2); prints the API and dashboard URLs; ``--address`` joins a cluster.
- ``kvserve chat [MESSAGE] [--url URL]``: chat that streams, against a running server
  (``--url``) or an engine in this process; no MESSAGE: an interactive conversation.
- ``kvserve generate PROMPT...``: offline completions in this process.
- ``kvserve status``: a table of the engine instances (from the cluster's ledger).
- ``kvserve plan``: KV-cache arithmetic for a model, GPU memory, TP and context length.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvserve", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log start-up")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the serving application")
    _add_model_args(s)
    s.add_argument("--config", default=None, help="YAML file of ServeConfig fields")
    s.add_argument(
        "--model-name", default=None, help="the name clients send (default: the model's)"
    )
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size per instance")
    s.add_argument("--replicas", type=int, default=None, help="engine instances in the pool")
    # Removed flags: accepted only to say what replaced them (ServeConfig.from_dict).
    for gone in ("--router-replicas", "--ingress", "--engine-process"):
        s.add_argument(gone, default=None, help=argparse.SUPPRESS)
    s.add_argument(
        "--mode",
        choices=["colocated", "disaggregated"],
        default=None,
        help="one pool, or separate prefill and decode pools (default colocated)",
    )
    s.add_argument(
        "--prefill-replicas", type=int, default=None, help="disaggregated: prefill instances"
    )
    s.add_argument(
        "--decode-replicas", type=int, default=None, help="disaggregated: decode instances"
    )
    s.add_argument("--haproxy", action=argparse.BooleanOptionalAction, default=None,
                   help="HAProxy in front instead of Serve's Python proxy (default: on when "
                   "this command starts Ray and HAProxy is installed)")  # fmt: skip
    s.add_argument("--api-replicas", type=int, default=None,
                   help="API processes (HTTP/gRPC front, placement, failover; default 2)")  # fmt: skip
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None,
                   help="Serve's access log, a line per request (default off)")  # fmt: skip
    s.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000; 0: off)")
    s.add_argument("--address", default=None, help="join this Ray cluster (default: start one)")
    s.add_argument("--chat", default=None, metavar="MESSAGE",
                   help="once up, send MESSAGE through the API and print the answer")  # fmt: skip
    s.add_argument("--exit", action="store_true", help="stop after --chat instead of serving on")

    c = sub.add_parser("chat", help="chat, streaming (a server with --url, else in process)")
    c.add_argument("text", nargs="*", help="one message (none: interactive)")
    c.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    c.add_argument("--api-key", default=None)
    _add_model_args(c)
    _add_sampling_args(c)

    g = sub.add_parser("generate", help="complete prompts in this process")
    g.add_argument("text", nargs="+", help="prompt(s)")
    _add_model_args(g)
    _add_sampling_args(g)

    st = sub.add_parser("status", help="table of the cluster's engine instances")
    st.add_argument("--address", default="auto")
    st.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="KV cache arithmetic for a deployment")
    pl.add_argument("--model", default=None, help="HF directory, .gguf, or a bench shape name")
    pl.add_argument("--gpu-memory-gib", type=float, default=80.0)
    pl.add_argument("--utilization", type=float, default=0.9)
    pl.add_argument("--tp", type=int, default=1)
    pl.add_argument("--context", type=int, default=8192, help="tokens per session")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    pl.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    pl.add_argument("--block-size", type=int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    commands = {"serve": cmd_serve, "chat": cmd_chat, "generate": cmd_generate,
                "status": cmd_status, "plan": cmd_plan}  # fmt: skip
    try:
        return int(commands[args.cmd](args))
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2


# --- serve ------------------------------------------------------------------------------
def _pools(cfg: Any) -> str:
    if cfg.mode == "disaggregated":
        return f"{cfg.prefill_replicas} prefill + {cfg.decode_replicas} decode instance(s)"
    return f"{cfg.num_replicas} instance(s)"


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import haproxy_in_front, run
    from cluster.config import ServeConfig

    data = ServeConfig.from_yaml(args.config).to_dict() if args.config else {}
    for field, value in (("model", args.model), ("model_name", args.model_name),
                         ("tensor_parallel_size", args.tp), ("num_replicas", args.replicas),
                         ("router_replicas", args.router_replicas),
                         ("host", args.host), ("http_port", args.port),
                         ("grpc_port", args.grpc_port), ("mode", args.mode),
                         ("prefill_replicas", args.prefill_replicas),
                         ("decode_replicas", args.decode_replicas),
                         ("haproxy", args.haproxy), ("ingress", args.ingress),
                         ("engine_process", args.engine_process),
                         ("api_replicas", args.api_replicas),
                         ("access_log", args.access_log)):  # fmt: skip
        if value is not None:
            data[field] = value
    if args.device != "auto":
        data["device"] = args.device
    if args.max_model_len:
        data["engine"] = {**data.get("engine", {}), "max_model_len": args.max_model_len}
    cfg = ServeConfig.from_dict(data)  # validated once
    t0 = time.perf_counter()
    try:
        dashboard = run(cfg, args.address, dashboard=True)
    except RuntimeError as e:  # a deployment failed, or cannot be placed
        console.print(f"[red]error:[/red] {e}")
        serve.shutdown()
        return 1
    base = f"http://{cfg.host}:{cfg.http_port}"
    console.print(f"[bold green]kvserve is up[/bold green] in {time.perf_counter() - t0:.0f} s: "
                  f"model [bold]{cfg.served_name}[/bold], {_pools(cfg)}, "
                  f"TP {cfg.tensor_parallel_size}")  # fmt: skip
    console.print(f"  OpenAI API     {base}/v1   (try: kvserve chat --url {base})")
    console.print(f"  health         {base}/health")
    if cfg.grpc_port:
        console.print(f"  gRPC           {cfg.host}:{cfg.grpc_port}   (kvserve.v1.KVServe)")
    if dashboard:
        console.print(f"  Ray dashboard  http://{dashboard}")
    gcs = ray.get_runtime_context().gcs_address
    console.print(f"  Ray cluster    {gcs}   (RAY_AUTH_MODE=token kvserve status --address {gcs})")
    proxy = "HAProxy (Serve's direct ingress)" if haproxy_in_front() else "Serve's proxy"
    console.print(f"  front          {proxy} to {cfg.api_replicas} API replicas")
    if args.chat:
        answer = _chat_http(base, [{"role": "user", "content": args.chat}], cfg.served_name,
                            {"max_tokens": 128, "temperature": 0}, None)  # fmt: skip
        if not answer:
            return 1
    if args.exit:
        serve.shutdown()
        return 0
    console.print("[dim]serving; Ctrl-C stops[/dim]")
    # SIGTERM (kill, Kubernetes, systemd) stops like Ctrl-C: Serve shuts down, and with
    # it HAProxy, which would otherwise outlive this process and keep its ports.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


# --- chat -------------------------------------------------------------------------------
def _chat_http(base: str, messages: list[dict[str, str]], model: str | None,
               sampling: dict[str, Any], api_key: str | None) -> str:  # fmt: skip
    """Streams one answer from the server's chat endpoint to the terminal; returns it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": messages, "stream": True, **sampling}
    parts: list[str] = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as r:  # fmt: skip
        if r.status_code != 200:
            r.read()
            console.print(f"[red]error {r.status_code}:[/red] {r.text}")
            return ""
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                console.print(f"\n[red]error:[/red] {chunk['error']['message']}")
                break
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                parts.append(piece)
                console.print(piece, end="", markup=False, highlight=False)
    console.print()
    return "".join(parts)


def _chat_local(engine: Any, messages: list[dict[str, str]], params: Any) -> str:
    """Streams one answer from an in-process engine (add_request + step)."""
    rid = engine.add_request(engine.apply_chat_template(messages), params)
    shown = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                text = out.outputs[0].text
                console.print(text[len(shown) :], end="", markup=False, highlight=False)
                shown = text
    console.print()
    return shown


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    if args.url:

        def answer(msgs: list[dict[str, str]]) -> str:
            return _chat_http(args.url.rstrip("/"), msgs, None, sampling, args.api_key)
    else:
        from engine import LLM, SamplingParams

        llm = LLM(args.model, device=args.device,
                  **({"max_model_len": args.max_model_len} if args.max_model_len else {}))  # fmt: skip
        params = SamplingParams(**sampling)

        def answer(msgs: list[dict[str, str]]) -> str:
            return _chat_local(llm.engine, msgs, params)

    if args.text:
        return 0 if answer([{"role": "user", "content": " ".join(args.text)}]) else 1
    history: list[dict[str, str]] = []
    console.print("[dim]an empty line or Ctrl-D ends the conversation[/dim]")
    while True:
        try:
            line = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        console.print("[bold]kvserve>[/bold] ", end="")
        history.append({"role": "assistant", "content": answer(history)})
    return 0


# --- generate ---------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    kw: dict[str, Any] = {"device": args.device}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **kw)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    outs = llm.generate(args.text, params)
    gen_s = time.perf_counter() - t0
    ntok = 0
    for out in outs:
        sample = out.outputs[0]
        ntok += len(sample.token_ids)
        console.print(f"[bold]{out.prompt}[/bold]", end="")
        console.print(sample.text, markup=False, highlight=False)
        console.print(
            f"[dim]({len(sample.token_ids)} tokens, finish: {sample.finish_reason})[/dim]"
        )
    console.print(f"[dim]loaded in {load_s:.1f} s; {ntok} tokens in {gen_s:.2f} s "
                  f"({ntok / gen_s:.1f} tok/s)[/dim]")  # fmt: skip
    return 0


# --- status -----------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from cluster.placement.ledger import get_ledger

    ray.init(address=args.address, logging_level=logging.ERROR)
    rows = ray.get(get_ledger().instances.remote())
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = Table(title=f"kvserve instances ({len(rows)})")
    for col in ("instance", "model", "role", "TP", "blocks used/free", "KV use", "running",
                "waiting", "prefix hit rate", "preemptions", "seen"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        used = r["num_blocks"] - r["free_blocks"]
        q = r["prefix_cache_queries"]
        rate = f"{r['prefix_cache_hits'] / q:.0%}" if q else "-"
        table.add_row(str(r["instance_id"])[:12], r.get("model", "?"), r.get("role", "?"),
                      str(r["tp"]), f"{used}/{r['free_blocks']}", f"{r['kv_usage']:.0%}",
                      str(r["running"]), str(r["waiting"]), rate, str(r["preemptions"]),
                      f"{r['age_s']:.1f}s ago" + (" DEAD" if r.get("dead") else ""))  # fmt: skip
    console.print(table)
    return 0


# --- plan -------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
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
    table.add_row(f"sessions of {args.context:,} tokens", f"{tokens / args.context:.1f}")
    console.print(table)
    console.print("[dim]activations and CUDA graphs take a little more; the engine logs its "
                  "exact plan at start-up[/dim]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
