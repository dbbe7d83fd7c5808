"""The router's own cost: the same streaming load through the Serve app's HTTP API and
straight into an in-process ``AsyncEngine`` with the same engine arguments.

``python -m bench.router [--device cpu|cuda] [--model M] [--concurrency 16]
[--requests 64] [--prompt-words 64] [--max-tokens 32] [--out DIR]``

``--model`` takes an HF directory / GGUF, or a bench shape name (random weights,
``load_format=dummy``). The in-process run goes first, then a local Ray starts and the
app serves the same engine in a replica. Ratios: TTFT added at the median and p90
(served − in-process), and throughput served / in-process. One record under
``bench/results/`` (suite ``router``); ``python -m bench.report`` renders it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any, Self

import torch

from bench import loadgen
from bench.common import RESULTS_DIR, environment, free_port, write_result


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    from bench.synthetic import write_model_dir
    from engine.shapes import MODELS, make_config

    kw: dict[str, Any] = {"device": args.device, "max_model_len": args.max_model_len,
                          "max_num_seqs": max(64, args.concurrency)}  # fmt: skip
    if args.model in MODELS:
        import tempfile

        kw["model"] = str(
            write_model_dir(make_config(args.model), Path(tempfile.mkdtemp()) / args.model)
        )
        kw["load_format"] = "dummy"
    else:
        kw["model"] = args.model
    return kw


async def in_process(
    kw: dict[str, Any], ps: list[str], args: argparse.Namespace
) -> tuple[Any, float]:
    from cluster.async_engine import AsyncEngine
    from cluster.process import freeze_heap
    from engine.config import EngineArgs
    from engine.sampling_params import SamplingParams

    engine = AsyncEngine(EngineArgs(**kw))
    freeze_heap()  # as the served processes do after their start
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    async def one(prompt: str) -> loadgen.Record:
        rec = loadgen.Record(sent=time.perf_counter())
        seen = 0
        async for out in engine.generate(prompt, params):
            n = len(out.outputs[0].token_ids)
            if n > seen:
                rec.chunks.append((time.perf_counter(), n - seen))
                seen = n
        return rec

    await loadgen.run_load(one, loadgen.prompts(4, 16, seed=99), args.concurrency, None, False)
    result = await loadgen.run_load(one, ps, args.concurrency, None)
    engine.shutdown()
    return result


class _Sampler:
    """A thread that runs ``_run`` (until ``_stop`` is set) while a ``with`` block does."""

    def __init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CPUSampler(_Sampler):
    """Per-process CPU use (percent of one core) while the served load runs, grouped by
    what the process is (Serve proxy, router, engine replica, this driver + client)."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__()
        self.period_s = period_s
        self.samples: dict[str, list[float]] = {}

    @staticmethod
    def group(cmdline: str) -> str | None:
        if "ProxyActor" in cmdline:
            return "serve-proxy"
        for name in ("router", "engine", "api", "decode", "prefill"):
            if f":kvserve:{name}" in cmdline or f"#{name}#" in cmdline:
                return f"replica-{name}"
        if "bench.router" in cmdline or "multiprocessing.spawn" in cmdline:
            return "driver+client"
        if "raylet" in cmdline or "gcs_server" in cmdline or "ServeController" in cmdline:
            return "ray-system"
        return None

    def _run(self) -> None:
        import psutil

        procs: dict[int, tuple[Any, str]] = {}
        while not self._stop.wait(self.period_s):
            totals: dict[str, float] = {}
            for p in psutil.process_iter(["pid", "cmdline"]):
                if p.pid not in procs:
                    g = self.group(" ".join(p.info["cmdline"] or []))
                    if g is None:
                        continue
                    procs[p.pid] = (p, g)
                    p.cpu_percent(None)
                    continue
            for pid, (p, g) in list(procs.items()):
                try:
                    totals[g] = totals.get(g, 0.0) + p.cpu_percent(None)
                except psutil.Error:
                    procs.pop(pid)
            for g, v in totals.items():
                self.samples.setdefault(g, []).append(v)

    def summary(self) -> dict[str, float]:
        """Mean percent of a core per group over the run (samples after the first)."""
        return {
            g: round(sum(v[1:]) / max(len(v) - 1, 1), 1) for g, v in sorted(self.samples.items())
        }


class LagSampler(_Sampler):
    """The engine replicas' event-loop lag during the served load, from their ledger
    reports (each covers the second before it): the median of the reports' p50 and
    p99, and the largest lag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[dict[str, float]] = []

    def _run(self) -> None:
        import ray

        from cluster.placement.ledger import get_ledger

        seen: set[tuple[str, float]] = set()
        while not self._stop.wait(1.0):
            try:
                rows = ray.get(get_ledger().instances.remote(), timeout=5)
            except Exception:
                continue
            for r in rows:
                key = (str(r["instance_id"]), float(r.get("time", 0.0)))
                if "loop_lag_p50_ms" in r and key not in seen:
                    seen.add(key)
                    self.reports.append({k: r[k] for k in r if k.startswith("loop_lag_")})

    def summary(self) -> dict[str, float]:
        import statistics

        if not self.reports:
            return {}
        return {"p50_ms": statistics.median(r["loop_lag_p50_ms"] for r in self.reports),
                "p99_ms": statistics.median(r["loop_lag_p99_ms"] for r in self.reports),
                "max_ms": max(r["loop_lag_max_ms"] for r in self.reports),
                "reports": len(self.reports)}  # fmt: skip


def _in_process_entry(
    kw: dict[str, Any], ps: list[str], args: argparse.Namespace
) -> tuple[Any, float]:
    return asyncio.run(in_process(kw, ps, args))


def run_in_process(
    kw: dict[str, Any], ps: list[str], args: argparse.Namespace
) -> tuple[Any, float]:
    """The in-process run, in a child process on a GPU: the served replica is another
    process and must find the device's memory free (the caching allocator of this one
    would keep the first engine's weights and KV pool reserved)."""
    if not str(args.device).startswith("cuda"):
        result = asyncio.run(in_process(kw, ps, args))
        gc.collect()
        return result
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_in_process_entry, kw, ps, args).result()


def wait_ready(url: str, timeout_s: float = 600.0) -> None:
    """Until ``/health`` is 200 and the router's prefix affinity is no longer loading (its
    tokenizer load would otherwise run during the measured load)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code == 200 and r.json().get("affinity") != "loading":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:g} s")


def replica_url() -> str:
    """The HTTP server of the one engine-ingress replica behind HAProxy (Serve's direct
    ingress binds it from port 30000 on): the load goes there, past HAProxy."""
    import httpx

    for port in range(30000, 30100):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and "instances" in r.json():
            return f"http://127.0.0.1:{port}"
    raise RuntimeError("no engine replica answers on ports 30000-30099")


def served(
    kw: dict[str, Any], ps: list[str], args: argparse.Namespace
) -> tuple[tuple[Any, float], dict[str, float], dict[str, Any] | None, dict[str, float]]:
    """The served load; with it, the CPU use per process group, (``--profile``) the
    py-spy summaries of the proxy, router and engine replica, and the engine replicas'
    event-loop lag (``LagSampler``)."""
    import ray
    from ray import serve

    from cluster.app import run, use_haproxy_locally
    from cluster.config import ServeConfig

    if args.haproxy:
        use_haproxy_locally()
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    model = kw.pop("model")
    cfg = ServeConfig(model=model, model_name="bench", device=kw.pop("device"), http_port=port,
                      grpc_port=0, engine=kw, stream_interval_s=args.stream_interval,
                      haproxy=args.haproxy, api_replicas=args.api_replicas)  # fmt: skip
    run(cfg)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    if args.bypass_haproxy:
        url = replica_url()
    asyncio.run(loadgen.http_load(url, "bench", loadgen.prompts(4, 16, seed=99), args.max_tokens,
                                  args.concurrency, None, progress=False))  # fmt: skip
    profiler = None
    if args.profile is not None:
        from bench.profile import Profiler

        profiler = Profiler(CPUSampler.group, args.profile, seconds=args.profile_seconds)
    with CPUSampler() as cpu, LagSampler() as lag:
        if profiler is not None:
            profiler.start()
        result = loadgen.http_load_procs(url, "bench", ps, args.max_tokens, args.concurrency,
                                         args.client_procs)  # fmt: skip
    profile = profiler.join() if profiler is not None else None
    serve.shutdown()
    ray.shutdown()
    return result, cpu.summary(), profile, lag.summary()


def _profile_tops(profile: Any, top: int = 12) -> dict[str, Any] | None:
    """The first ``top`` frames of each profiled process's summary (the record keeps
    these; ``profile.json`` keeps all)."""
    if not isinstance(profile, dict):
        return None
    tops: dict[str, Any] = {}
    for g, runs in profile.items():
        if g == "error":
            tops[g] = runs
            continue
        tops[g] = [{k: (v[:top] if isinstance(v, list) else v) for k, v in r.items()} for r in runs]
    return tops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--stream-interval", type=float, default=0.0,
                   help="ServeConfig.stream_interval_s of the served engine")  # fmt: skip
    p.add_argument("--client-procs", type=int, default=1,
                   help="load-generating processes for the served run (concurrency split)")  # fmt: skip
    p.add_argument("--haproxy", action="store_true", help="ServeConfig.haproxy: HAProxy in front")
    p.add_argument("--api-replicas", type=int, default=2, help="ServeConfig.api_replicas")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy the proxy, router and engine replica during the served load; "
                   "raw stacks and profile.json go to this folder")  # fmt: skip
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--bypass-haproxy", action="store_true",
                   help="with --haproxy: load one API replica's own HTTP server "
                   "(what HAProxy adds, apart)")  # fmt: skip
    p.add_argument("--save-records", action="store_true",
                   help="write both runs' per-request records (sent, chunks, timing_ms) to "
                   "OUT/records-TAG.json")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the workload name (ROUTER-TAG)")
    args = p.parse_args(argv)
    kw = engine_args(args)
    ps = loadgen.prompts(args.requests, args.prompt_words)
    local_records, local_wall = run_in_process(dict(kw), ps, args)
    (http_records, http_wall), cpu, profile, lag = served(dict(kw), ps, args)
    if args.save_records:
        import json

        recs = {"in_process": loadgen.records_json(local_records),
                "served": loadgen.records_json(http_records)}  # fmt: skip
        (args.out / f"records-{args.tag or 'router'}.json").write_text(json.dumps(recs))
    local = loadgen.summarize(local_records, local_wall)
    http = loadgen.summarize(http_records, http_wall)
    ratios = {
        "ttft_p50_added_ms": (http["ttft_s"]["p50"] - local["ttft_s"]["p50"]) * 1e3,
        "ttft_p90_added_ms": (http["ttft_s"]["p90"] - local["ttft_s"]["p90"]) * 1e3,
        "itl_p50_added_ms": (http["itl_s"]["p50"] - local["itl_s"]["p50"]) * 1e3,
        "throughput_served_over_in_process": http["output_tok_s"] / local["output_tok_s"],
    }
    device = torch.device(args.device if args.device != "auto" else "cpu")
    result = {
        "peer": "the same engine in process (AsyncEngine, no HTTP, no Serve)",
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "tag", "profile", "save_records")
        }
        | {"model": args.model or "SmolLM2-135M-Instruct"}
        | {"serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}},
        "raw": {"in_process": local, "served": http},
        "ratios": ratios,
        "served_cpu_percent": cpu,
        "served_loop_lag_ms": lag,
        "served_profile_gil_pct": _profile_tops(profile),
        "notes": {
            "served_cpu_percent": "mean CPU use per process group during the served load, "
            "percent of one core",
            "served_loop_lag_ms": "the engine replicas' event-loop lag during the served load "
            "(median of their per-second p50 and p99, and the largest)",
            "*_added_ms": "served − in-process at that percentile (what the router, Serve's "
            "proxy and the handle add); goal on GPU: <= 3 ms at the median, 64 streams",
            "throughput_served_over_in_process": "output tokens/s through HTTP over in process; "
            "goal on GPU: >= 0.9 at 64 concurrent streams",
        },
    }
    name = f"ROUTER-{args.tag}" if args.tag else "ROUTER"
    path = write_result(args.out, "router", name, environment(device), {}, result)
    print(ratios, cpu, lag, "->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
