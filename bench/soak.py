"""Soak: streaming load through the HTTP and gRPC APIs at once, for a count of requests
or a length of time, then the books: errors, lost requests, blocks and reservations
left behind, TTFT and ITL percentiles.

``python -m bench.soak [--device cuda] [--model M] [--mode colocated|disaggregated]
[--replicas 1] [--concurrency 64] [--requests 400 | --duration-s 600] [--max-tokens 64]
[--prompt-words 64] [--kill-every-s S] [--out DIR]``

Starts a local Ray and the app (``--model``: a directory / GGUF or a bench shape name
with random weights). Half the clients use HTTP (SSE), half gRPC (``GenerateStream``).
Every prompt is one of ``--distinct`` prompts, so outputs can be checked: greedy, so
every answer to one prompt must be the same text. ``--kill-every-s``: a chaos soak,
``ray.kill`` of a random engine replica that often (needs 2+ replicas). At the end it
waits for every replica to be idle with all blocks free and the ledger to hold no
reservation. Exit status 1 if a request failed, was lost or differed, or anything
leaked. A record goes under ``bench/results/`` (suite ``soak``).

``run_soak`` is the same against an app that is already up (the CPU test uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen


@dataclass
class SoakResult:
    records: list[loadgen.Record]
    wall_s: float
    by_api: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [str(r.error) for r in self.records if r.error is not None]

    def mismatches(self) -> list[str]:
        """Prompts whose completed answers differ from one another (greedy: they must not)."""
        texts: dict[str, set[str]] = {}
        for r in self.records:
            if r.error is None:
                texts.setdefault(r.prompt, set()).add(r.text)
        return [p for p, ts in texts.items() if len(ts) > 1]

    def summary(self) -> dict[str, Any]:
        out = loadgen.summarize(self.records, self.wall_s)
        out.update(by_api=self.by_api, mismatched_prompts=len(self.mismatches()),
                   error_count=len(self.errors))  # fmt: skip
        return out


async def _soak(url: str, grpc_target: str | None, model: str, prompt_list: list[str],
                max_tokens: int, concurrency: int) -> SoakResult:  # fmt: skip
    t0 = time.perf_counter()
    if grpc_target is None:
        records, _ = await loadgen.http_load(url, model, prompt_list, max_tokens, concurrency,
                                             None, progress=False)  # fmt: skip
        return SoakResult(records, time.perf_counter() - t0, {"http": len(records)})
    half = (len(prompt_list) + 1) // 2
    c_http = max(1, concurrency // 2)
    (h, _), (g, _) = await asyncio.gather(
        loadgen.http_load(url, model, prompt_list[:half], max_tokens, c_http, None,
                          progress=False),
        loadgen.grpc_load(grpc_target, model, prompt_list[half:], max_tokens,
                          max(1, concurrency - c_http), None, progress=False),
    )  # fmt: skip
    return SoakResult(h + g, time.perf_counter() - t0, {"http": len(h), "grpc": len(g)})


def run_soak(url: str, grpc_target: str | None, model: str, requests: int, concurrency: int,
             max_tokens: int, distinct: int = 8, prompt_words: int = 32,
             seed: int = 0) -> SoakResult:  # fmt: skip
    """``requests`` streaming requests at ``concurrency`` clients (half HTTP, half gRPC
    when ``grpc_target`` is given) over ``distinct`` prompts, in a shuffled order."""
    base = loadgen.prompts(distinct, prompt_words, seed=seed)
    rng = random.Random(seed)
    prompt_list = [base[i % distinct] for i in range(requests)]
    rng.shuffle(prompt_list)
    return asyncio.run(_soak(url, grpc_target, model, prompt_list, max_tokens, concurrency))


def books(deployments: list[str], timeout_s: float = 120) -> dict[str, Any]:
    """Waits for every replica of ``deployments`` to be idle with every block free and the
    ledger to hold no reservation; what was found (``whole``: whether it got there)."""
    import ray
    from ray import serve

    from cluster.placement.ledger import get_ledger

    deadline = time.monotonic() + timeout_s
    found: dict[str, Any] = {}
    while True:
        found = {"replicas": {}, "whole": True}
        for name in deployments:
            h = serve.get_deployment_handle(name, app_name="kvserve")
            for uid in replica_ids(name):
                try:
                    s = h.stats.options().remote(target=uid).result(timeout_s=30)
                except Exception as e:  # a replica stopping or starting
                    found["whole"] = False
                    found["replicas"][uid] = repr(e)[:200]
                    continue
                idle = s["running"] == 0 and s["waiting"] == 0 and not s["dead"]
                leaked = s["num_blocks"] - s["free_blocks"]
                found["replicas"][uid] = {"role": s["role"], "idle": idle, "blocks_held": leaked}
                found["whole"] = found["whole"] and idle and leaked == 0
        totals = ray.get(get_ledger().totals.remote())
        found["ledger"] = totals
        found["whole"] = found["whole"] and totals["reserved"] == 0
        if found["whole"] or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def replica_ids(deployment: str) -> set[str]:
    """Unique ids of the live replicas of one of the ``kvserve`` app's deployments."""
    import ray

    prefix = f"SERVE_REPLICA::kvserve#{deployment}#"
    return {a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}  # fmt: skip


def kill_replica(deployment: str, unique_id: str) -> None:
    import ray

    name = f"SERVE_REPLICA::kvserve#{deployment}#{unique_id}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


class Chaos(threading.Thread):
    """Kills a random replica of ``deployment`` every ``every_s`` seconds (never the last
    one left) until stopped; counts the kills."""

    def __init__(self, deployment: str, every_s: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.deployment, self.every_s = deployment, every_s
        self.rng = random.Random(seed)
        self.kills = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            ids = sorted(replica_ids(self.deployment))
            if len(ids) >= 2:
                kill_replica(self.deployment, self.rng.choice(ids))
                self.kills += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--mode", default="colocated", choices=["colocated", "disaggregated"])
    p.add_argument("--replicas", type=int, default=1, help="engine (decode) replicas")
    p.add_argument("--prefill-replicas", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=400, help="per round")
    p.add_argument("--duration-s", type=float, default=0.0, help="repeat rounds this long")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--distinct", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kill-every-s", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from bench.common import RESULTS_DIR, environment, free_port, write_result
    from bench.router import engine_args
    from cluster.app import run
    from cluster.config import ServeConfig

    kw = engine_args(argparse.Namespace(device=args.device, model=args.model,
                                        max_model_len=args.max_model_len,
                                        concurrency=args.concurrency))  # fmt: skip
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    model = kw.pop("model")
    cfg = ServeConfig(model=model, model_name="soak", device=kw.pop("device"), engine=kw,
                      http_port=http_port, grpc_port=grpc_port, mode=args.mode,
                      num_replicas=args.replicas, decode_replicas=args.replicas,
                      prefill_replicas=args.prefill_replicas)  # fmt: skip
    run(cfg)
    url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    pool = "decode" if args.mode == "disaggregated" else "engine"
    chaos = Chaos(pool, args.kill_every_s) if args.kill_every_s else None
    if chaos:
        chaos.start()
    records: list[loadgen.Record] = []
    by_api: dict[str, int] = {}
    t0 = time.perf_counter()
    rounds = 0
    while True:
        res = run_soak(url, target, "soak", args.requests, args.concurrency, args.max_tokens,
                       args.distinct, args.prompt_words, seed=rounds)  # fmt: skip
        records += res.records
        for k, v in res.by_api.items():
            by_api[k] = by_api.get(k, 0) + v
        rounds += 1
        print(f"round {rounds}: {len(res.records)} requests, {len(res.errors)} errors", flush=True)
        if time.perf_counter() - t0 >= args.duration_s:
            break
    if chaos:
        chaos.stop()
    total = SoakResult(records, time.perf_counter() - t0, by_api)
    pools = ["prefill", "decode"] if args.mode == "disaggregated" else ["engine"]
    final = books(pools)
    summary = total.summary() | {"rounds": rounds, "faults_injected": chaos.kills if chaos else 0,
                                 "books": final}  # fmt: skip
    serve.shutdown()
    ray.shutdown()
    lost = len(records) - sum(1 for r in records if r.done or r.error is not None)
    summary["lost"] = lost
    ok = not total.errors and not total.mismatches() and lost == 0 and final["whole"]
    print({k: summary[k] for k in ("requests", "ok", "error_count", "lost", "mismatched_prompts",
                                   "faults_injected", "ttft_s", "itl_s")}, "books whole:",
          final["whole"])  # fmt: skip
    device = torch.device(args.device if args.device != "auto" else "cpu")
    result = {"peer": "none: a reliability run (errors, losses, leaks; latency percentiles)",
              "config": {k: v for k, v in vars(args).items() if k != "out"}
              | {"model": args.model or "SmolLM2-135M-Instruct"},
              "raw": summary, "ratios": {"requests_lost": lost,
                                          "error_rate": len(total.errors) / max(len(records), 1)},
              "notes": {"books": "replicas idle with every block free, ledger without "
                                 "reservations, checked after the load"}}  # fmt: skip
    path = write_result(args.out or RESULTS_DIR, "soak", f"SOAK-{args.mode}", environment(device),
                        {}, result)  # fmt: skip
    print("->", path)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
