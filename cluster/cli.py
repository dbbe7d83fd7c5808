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
from rich.markup import escape
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
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log start-up, and show Ray's, Serve's and HAProxy's logs")  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)

    from cluster.config import config_table

    s = sub.add_parser("serve", help="run the serving application",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="settings (--set NAME=VALUE, or YAML keys in --config):\n"
                       + config_table())  # fmt: skip
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any setting below (pd.NAME, faults.NAME for theirs); the value "
                   "read as YAML")  # fmt: skip
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's, Serve's and HAProxy's logs too")  # fmt: skip
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

    ca = sub.add_parser("cache", help="the cluster's KV cache: `cache reset` empties every "
                        "instance's prefix cache")  # fmt: skip
    ca.add_argument("action", choices=["reset"])
    ca.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    ca.add_argument("--api-key", default=None)

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
    from cluster.chat import cmd_chat, cmd_generate
    from cluster.plan import cmd_plan

    commands = {"serve": cmd_serve, "chat": cmd_chat, "generate": cmd_generate,
                "status": cmd_status, "plan": cmd_plan, "cache": cmd_cache}  # fmt: skip
    try:
        return int(commands[args.cmd](args))
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return 2


# --- serve ------------------------------------------------------------------------------
def _pools(cfg: Any) -> str:
    if cfg.mode == "disaggregated":
        return (f"{cfg.prefill_replicas} prefill (TP {cfg.pool_tp('prefill')}) + "
                f"{cfg.decode_replicas} decode (TP {cfg.pool_tp('decode')}) instance(s)")  # fmt: skip
    return f"{cfg.num_replicas} instance(s) of TP {cfg.tensor_parallel_size}"


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import haproxy_in_front, run
    from cluster.config import ServeConfig, apply_settings, with_env

    data = ServeConfig.from_yaml(args.config).to_dict() if args.config else {}
    data = apply_settings(data, args.set)
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
    cfg = ServeConfig.from_dict(with_env(data))  # validated once
    t0 = time.perf_counter()
    try:
        dashboard = run(cfg, args.address, dashboard=True, verbose=args.verbose)
    except RuntimeError as e:  # a deployment failed, or cannot be placed
        console.print(f"[red]error:[/red] {escape(str(e))}")
        serve.shutdown()
        return 1
    base = f"http://{cfg.host}:{cfg.http_port}"
    console.print(
        f"[bold green]kvserve is up[/bold green] in {time.perf_counter() - t0:.0f} s: "
        f"model [bold]{cfg.served_name}[/bold], {_pools(cfg)}"
    )
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
        from cluster.chat import chat_http

        answer = chat_http(base, [{"role": "user", "content": args.chat}], cfg.served_name,
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


# --- cache ------------------------------------------------------------------------------
def cmd_cache(args: argparse.Namespace) -> int:
    """``kvserve cache reset``: ``POST /reset_prefix_cache`` on the server at ``--url``."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.post(f"{args.url.rstrip('/')}/reset_prefix_cache", headers=headers, timeout=60)
    if r.status_code != 200:
        console.print(f"[red]error:[/red] HTTP {r.status_code}: {escape(r.text)}")
        return 1
    done = r.json()["instances"]
    for instance, forgotten in done.items():
        console.print(f"{instance}: {forgotten} cached blocks forgotten"
                      if isinstance(forgotten, int) else f"{instance}: [red]{escape(forgotten)}[/red]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
