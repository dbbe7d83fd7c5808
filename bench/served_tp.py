"""W8 through the served path (issue 25): the Serve app at each TP size, over HTTP.

``python -m bench.served_tp [--device cuda] [--model llama3-8b-shape] [--tp 1,2]
[--no-kill] [--quick] [--out DIR]``

Per TP size, one engine replica of ``tensor_parallel_size`` ranks (one GPU each on
CUDA; gloo between CPU processes) serves, through ``/v1/completions`` (streamed, greedy,
``ignore_eos``):

- W2: ``w2_requests`` prompts one at a time, batch-1 inter-token latency;
- W1: ``w1_requests`` prompts at ``concurrency``, output tokens per second;
- the text of every W1 request, compared with the first TP size's (same prompts);
- at the largest TP size > 1 (unless ``--no-kill``): the W1 prompts again, and a rank
  actor of the replica killed (``ray.kill``) once they are running. Every stream must
  finish with its unkilled text (the requests resume on the replica Serve rebuilds), and
  every block come back.

Ratios: ITL p50 TP=n / TP=1 (goal <= 0.6 at n=2 on the 8B shape), W1 throughput
TP=n / TP=1, the share of texts equal to TP=1's, and the kill's figures. ``--model``
takes a bench shape name (random weights, ``load_format=dummy``) or a model directory.
One record ``W8-served`` under ``bench/results/`` (suite ``served-tp``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import loadgen

SUITE = "served-tp"


@dataclass(frozen=True, slots=True)
class ServedTPConfig:
    w2_requests: int = 8
    w2_max_tokens: int = 128
    w1_requests: int = 256
    w1_max_tokens: int = 128
    concurrency: int = 64
    prompt_words: int = 128
    max_model_len: int = 2048
    kill_after_s: float = 0.5  # after the killed run's first request is running
    seed: int = 0


QUICK = ServedTPConfig(w2_requests=2, w2_max_tokens=16, w1_requests=8, w1_max_tokens=48,
                       concurrency=8, prompt_words=16, max_model_len=256, kill_after_s=0.3)  # fmt: skip


def _engine_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle("engine", app_name="kvserve")


def _stats() -> dict[str, Any]:
    return dict(_engine_handle().stats.remote().result(timeout_s=30))


def _whole(timeout: float = 180) -> dict[str, Any]:
    """Waits until the deployment has its one replica again, idle with every block free and
    no ledger reservation left (``bench.soak.books``); returns those books."""
    from bench.soak import books

    deadline = time.monotonic() + timeout
    while True:
        found = books(["engine"], timeout_s=0)  # one look
        if found["whole"] and len(found["replicas"]) == 1:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine replica is not whole: {found}")
        time.sleep(1.0)


def _load(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[Any, float]:
    return asyncio.run(loadgen.http_load(url, "w8", prompts, max_tokens, concurrency, None,
                                         progress=False))  # fmt: skip


def _kill_run(url: str, prompts: list[str], max_tokens: int, concurrency: int,
              after_s: float) -> dict[str, Any]:  # fmt: skip
    """The prompts streamed while a rank actor of the replica is killed."""
    import ray

    out: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: out.update(
            zip(("records", "wall"), _load(url, prompts, max_tokens, concurrency), strict=True)
        )
    )
    worker.start()
    victim, running, deadline = None, 0, time.monotonic() + 120
    while time.monotonic() < deadline and worker.is_alive():
        s = _stats()
        if s["running"] > 0:
            time.sleep(after_s)
            s = _stats()
            victim, running = s["instance"], s["running"]
            ((namespace, name),) = s["rank_actors"][:1]
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            break
        time.sleep(0.05)
    worker.join()
    whole = _whole()
    return {"records": out["records"], "wall": out["wall"], "killed_instance": victim,
            "running_at_kill": running, "rebuilt": victim not in whole["replicas"]}  # fmt: skip


def run_served_tp(model: str, device: str, tps: list[int], cfg: ServedTPConfig,
                  kill: bool = True, engine: dict[str, Any] | None = None,
                  log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Every TP size in ``tps`` served in turn (a Ray must be up); a result body."""
    from ray import serve

    from bench.common import free_port
    from cluster.app import run
    from cluster.config import ServeConfig

    w2_prompts = loadgen.prompts(cfg.w2_requests, cfg.prompt_words, seed=cfg.seed + 1)
    w1_prompts = loadgen.prompts(cfg.w1_requests, cfg.prompt_words, seed=cfg.seed)
    kill_tp = max((t for t in tps if t > 1), default=None) if kill else None
    raw: dict[str, Any] = {}
    texts: dict[int, list[str]] = {}
    for tp in tps:
        port = free_port()
        run(ServeConfig(model=model, model_name="w8", device=device, http_port=port, grpc_port=0,
                        tensor_parallel_size=tp,
                        engine={"max_model_len": cfg.max_model_len, **(engine or {})}))  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _load(url, w2_prompts[:1], 4, 1)  # warm-up
        recs2, wall2 = _load(url, w2_prompts, cfg.w2_max_tokens, 1)
        recs1, wall1 = _load(url, w1_prompts, cfg.w1_max_tokens, cfg.concurrency)
        by_prompt = {r.prompt: r.text for r in recs1}
        texts[tp] = [by_prompt.get(p, "") for p in w1_prompts]
        raw[f"tp{tp}"] = {"W2": loadgen.summarize(recs2, wall2),
                          "W1": loadgen.summarize(recs1, wall1)}  # fmt: skip
        log(f"TP={tp}: ITL p50 {raw[f'tp{tp}']['W2']['itl_s']['p50'] * 1e3:.2f} ms, "
            f"W1 {raw[f'tp{tp}']['W1']['output_tok_s']:.0f} tok/s")  # fmt: skip
        if tp == kill_tp:
            k = _kill_run(url, w1_prompts, cfg.w1_max_tokens, cfg.concurrency, cfg.kill_after_s)
            got = {r.prompt: r for r in k["records"]}
            finished = [p for p in w1_prompts if got[p].error is None and got[p].done]
            same = [p for p, t in zip(w1_prompts, texts[tp], strict=True) if got[p].text == t]
            raw["kill"] = {"tp": tp, "requests": len(w1_prompts), "finished": len(finished),
                           "same_text": len(same), "killed_instance": k["killed_instance"],
                           "running_at_kill": k["running_at_kill"],
                           "rebuilt": k["rebuilt"],
                           "errors": [r.error for r in k["records"] if r.error][:5]}  # fmt: skip
            log(f"TP={tp} rank kill: {raw['kill']}")
        serve.delete("kvserve")
        serve.shutdown()
        time.sleep(2)
    base = tps[0]
    ratios: dict[str, float] = {}
    for tp in tps[1:]:
        one, n = raw[f"tp{base}"], raw[f"tp{tp}"]
        ratios[f"itl_p50_tp{tp}_over_tp{base}"] = (
            n["W2"]["itl_s"]["p50"] / one["W2"]["itl_s"]["p50"]
        )
        ratios[f"w1_tok_s_tp{tp}_over_tp{base}"] = (
            n["W1"]["output_tok_s"] / one["W1"]["output_tok_s"]
        )
        equal = sum(a == b for a, b in zip(texts[tp], texts[base], strict=True))
        ratios[f"same_text_tp{tp}_vs_tp{base}"] = equal / len(w1_prompts)
    if "kill" in raw:
        ratios["kill_finished"] = raw["kill"]["finished"] / raw["kill"]["requests"]
        ratios["kill_same_text"] = raw["kill"]["same_text"] / raw["kill"]["requests"]
    return {
        "config": {"model": os.path.basename(model.rstrip("/")), "tp": tps, **asdict(cfg)},
        "peer": f"the same app at TP={base}, same prompts",
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "itl_p50_tpN_over_tp1": "batch-1 ITL through HTTP: goal <= 0.6 at TP=2 (8B shape)",
            "same_text": "greedy W1 texts equal to the first TP size's",
            "kill": "a rank actor killed mid-stream: streams finished with their unkilled text",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.served_tp", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="default llama3-8b-shape (tiny with --quick)")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--quick", action="store_true", help="small loads (a smoke test)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    import torch

    from bench.common import RESULTS_DIR, environment, write_result
    from bench.router import engine_args

    cfg = QUICK if args.quick else ServedTPConfig()
    kw = engine_args(argparse.Namespace(device=args.device,
                                        model=args.model or ("tiny" if args.quick else "llama3-8b-shape"),
                                        max_model_len=cfg.max_model_len,
                                        concurrency=cfg.concurrency))  # fmt: skip
    model, device = kw.pop("model"), kw.pop("device")
    if device == "cuda":
        kw |= {"dtype": "bfloat16", "gpu_memory_utilization": 0.85}
    # CPU: logical CPUs beyond the cores, as the tests' cluster has (each rank and API
    # replica asks for a share; gloo ranks time-share the cores).
    cpus = None if device == "cuda" else max(8, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    tps = [int(x) for x in args.tp.split(",")]
    result = run_served_tp(model, device, tps, cfg, kill=not args.no_kill, engine=kw)
    name = "W8-served" + ("-quick" if args.quick else "")
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    path = write_result(args.out or RESULTS_DIR, SUITE, name, environment(dev), {}, result)
    print(f"{name}: {result['ratios']} -> {path}", flush=True)
    ray.shutdown()
    ok = all(result["ratios"].get(k, 1.0) == 1.0 for k in ("kill_finished", "kill_same_text"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
