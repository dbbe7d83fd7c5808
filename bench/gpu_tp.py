"""W8 of BENCHMARKS.md: tensor parallelism on the GPUs of one machine.

``python -m bench.gpu_tp [--parts overhead,w8,70b] [--tp 1,2] [--quick] [--out DIR]``

- ``overhead``: a tiny model's batch-1 decode step in process (TP=1) and through the
  worker group (TP=2): inter-token latency, and the driver's time submitting each
  step to the rank actors (what the orchestration costs per step).
- ``w8``: W2 (batch-1 ITL) and W1 (offline mix, throughput) of ``llama3-8b-shape`` at
  each TP size; ratios TP=n over TP=1 and over the floor of n GPUs (each GPU reads
  1/n of the weights and KV; the floor ignores the all-reduces).
- ``70b``: W2 and W1 of ``llama3-70b-shape`` at TP=2 (and 4 where lent), against the
  floor of those GPUs.

Random bf16 weights (``load_format="dummy"``); a local Ray starts in this process.
One record per part under ``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, environment, random_prompts, write_result
from bench.drivers import greedy, ours_token_times, timed
from bench.gpu_env import GPUEnv, Logger, gpu_ceilings
from bench.gpu_workloads import W1Config, W2Config, small_pool
from bench.synthetic import w1_floor, write_model_dir
from bench.workloads import latency_of
from engine.shapes import make_config

SUITE = "gpu-tp"
HANG_S = float(os.environ.get("KVSERVE_HANG_DUMP_S", "150"))


def _env(model: str, ceilings: dict[str, Any], log: Logger, root: Path) -> GPUEnv:
    config = make_config(model)
    model_dir = write_model_dir(config, root / model)
    return GPUEnv(torch.device("cuda", 0), torch.bfloat16, model_dir, config, ceilings, log)


def _scaled(ceilings: dict[str, Any], n: int) -> dict[str, Any]:
    """The ceilings of n GPUs working at once (n × one GPU's rates)."""
    return {**ceilings, "copy_bytes_per_s": ceilings["copy_bytes_per_s"] * n,
            "matmul_flop_per_s": ceilings["matmul_flop_per_s"] * n}  # fmt: skip


def _close(env: GPUEnv, llm: Any) -> None:
    llm.shutdown()
    del llm
    env.free()


def _arm_hang_dump(seconds: float) -> threading.Timer:
    """After ``seconds``: print this process's stacks, make the rank actors print theirs
    (SIGUSR1, see ``workers.rank_worker``), show the tail of their logs, exit 3."""

    def dump() -> None:
        print(f"--- no progress in {seconds:.0f} s: stacks ---", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        subprocess.run("pkill -USR1 -f '^ray::RankWorker'", shell=True, check=False)
        time.sleep(3)
        subprocess.run("tail -n 60 /tmp/ray/session_latest/logs/worker-*.err", shell=True,
                       check=False)  # fmt: skip
        os._exit(3)

    faulthandler.dump_traceback_later(seconds, exit=False)  # works with the GIL held
    timer = threading.Timer(seconds + 5, dump)
    timer.daemon = True
    timer.start()
    return timer


def _with_dispatch(dispatch: str | None) -> None:
    """Sets the TP dispatch mode of the next group (``workers.group`` reads the env)."""
    if dispatch:
        os.environ["KVSERVE_TP_DISPATCH"] = dispatch
    else:
        os.environ.pop("KVSERVE_TP_DISPATCH", None)


def profile_decode(llm: Any, prompt: list[int], steps: int, device: torch.device) -> dict[str, Any]:
    """GPU time of ``steps`` decode steps on rank 0 by kernel family (torch profiler):
    the all-reduces (NCCL) against everything else, and the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    engine.add_request(prompt, greedy(steps + 1))
    engine.step()  # the prefill, outside the profile
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    nccl = other = 0.0
    top: dict[str, float] = {}
    for e in prof.key_averages():
        t = float(getattr(e, "device_time_total", 0.0) or 0.0) / 1e6  # us -> s
        if t <= 0 or e.key.startswith(("cudaGraphLaunch", "ProfilerStep")):
            continue
        if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        if "nccl" in e.key.lower():
            nccl += t
        else:
            other += t
        top[e.key[:60]] = t
    head = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    return {"steps": steps, "wall_per_step_s": wall / steps, "nccl_per_step_s": nccl / steps,
            "other_kernels_per_step_s": other / steps,
            "top_kernels_per_step_s": {k: v / steps for k, v in head.items()}}  # fmt: skip


def w2(env: GPUEnv, tp: int, cfg: W2Config, dispatch: str | None = None,
       profile_steps: int = 0) -> dict[str, Any]:  # fmt: skip
    (prompt,) = random_prompts(1, cfg.prompt_len, cfg.prompt_len, env.vocab_size, cfg.seed)
    env.overrides = {"tensor_parallel_size": tp}
    _with_dispatch(dispatch)
    timer = _arm_hang_dump(HANG_S)
    llm = env.ours(**small_pool(cfg.prompt_len + cfg.output_len + 64))
    t0, times = ours_token_times(llm, prompt, greedy(cfg.output_len), env.device)
    ex = llm.engine.executor
    dispatch_s = getattr(ex, "dispatch_s", 0.0) / max(1, getattr(ex, "steps", 1))
    mode = getattr(ex, "dispatch", "in-process")
    prof: dict[str, Any] = {}
    if profile_steps:
        try:
            prof = profile_decode(llm, prompt, profile_steps, env.device)
            env.log(f"W2 TP={tp} profile: {prof}")
        except Exception as e:  # the profile is extra: never lose the timing to it
            env.log(f"W2 TP={tp} profile failed: {e!r}")
    _close(env, llm)
    _with_dispatch(None)
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    lat = latency_of(t0, times)
    rate = env.ceilings["copy_bytes_per_s"] * tp
    floors = [
        env.facts.decode_floor_s(cfg.prompt_len + k + 1, rate) for k in range(cfg.output_len - 1)
    ]
    floor = sum(floors) / len(floors)
    lat.pop("itl_s")
    env.log(f"W2 TP={tp} ({mode}): ITL median {lat['itl']['median'] * 1e3:.2f} ms "
            f"(floor {floor * 1e3:.2f} ms), dispatch {dispatch_s * 1e6:.0f} us/step")  # fmt: skip
    return {**lat, "floor_itl_mean_s": floor, "dispatch_s_per_step": dispatch_s,
            "dispatch": mode, "itl_median_over_floor": lat["itl"]["median"] / floor,
            **({"profile": prof} if prof else {})}  # fmt: skip


def w1(env: GPUEnv, tp: int, cfg: W1Config) -> dict[str, Any]:
    prompts = random_prompts(cfg.num_requests, cfg.prompt_len_min, cfg.prompt_len_max,
                             env.vocab_size, cfg.seed)  # fmt: skip
    env.overrides = {"tensor_parallel_size": tp}
    timer = _arm_hang_dump(HANG_S)
    llm = env.ours(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens)
    wall, outs = timed(env.device, lambda: llm.generate(prompts, greedy(cfg.output_len)))
    blocks = llm.engine.executor.num_blocks
    _close(env, llm)
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    floor = w1_floor(env.shape, 2, [len(p) for p in prompts], cfg.output_len,
                     _scaled(env.ceilings, tp))  # fmt: skip
    env.log(f"W1 TP={tp}: {wall:.2f} s, {out_tokens / wall:.0f} output tok/s "
            f"(floor {floor['floor_s']:.2f} s)")  # fmt: skip
    return {"wall_s": wall, "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
            "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + prompt_tokens) / wall,
            "num_blocks": blocks, "floor_s": floor["floor_s"],
            "wall_over_floor": wall / floor["floor_s"]}  # fmt: skip


def part_overhead(ceilings: dict[str, Any], log: Logger, root: Path, quick: bool) -> dict[str, Any]:
    env = _env("tiny", ceilings, log, root)
    cfg = W2Config(prompt_len=32, output_len=64 if quick else 256)
    raw = {"tp1": w2(env, 1, cfg), "tp2": w2(env, 2, cfg, "calls"),
           "tp2_compiled": w2(env, 2, cfg, "compiled")}  # fmt: skip
    one, two, dag = raw["tp1"], raw["tp2"], raw["tp2_compiled"]
    return {
        "config": {"model": "tiny", "prompt_len": cfg.prompt_len, "output_len": cfg.output_len},
        "raw": raw,
        "ratios": {
            "itl_median_tp2_minus_tp1_us": (two["itl"]["median"] - one["itl"]["median"]) * 1e6,
            "dispatch_us_per_step_tp2": two["dispatch_s_per_step"] * 1e6,
            "itl_median_tp1_us": one["itl"]["median"] * 1e6,
            "itl_median_tp2_us": two["itl"]["median"] * 1e6,
            "itl_median_tp2_compiled_minus_tp1_us": (dag["itl"]["median"] - one["itl"]["median"])
            * 1e6,
            "dispatch_us_per_step_tp2_compiled": dag["dispatch_s_per_step"] * 1e6,
        },
        "notes": {
            "itl_median_tp2_minus_tp1_us": "per decode step: what the group adds on a model "
            "whose compute is negligible (dispatch to the actors + two all-reduces a layer)",
            "dispatch_us_per_step_tp2": "driver time submitting execute() to the rank actors",
            "tp2 / tp2_compiled": "steps sent as Ray actor calls / through a Ray Compiled Graph",
        },
    }


def part_tp(model: str, tps: list[int], ceilings: dict[str, Any], log: Logger, root: Path,
            quick: bool, skip_w1: bool = False, profile_steps: int = 0,
            dispatches: tuple[str, ...] = ("calls",)) -> dict[str, Any]:  # fmt: skip
    env = _env(model, ceilings, log, root)
    w2cfg = W2Config(prompt_len=32, output_len=32) if quick else W2Config()
    w1cfg = (W1Config(num_requests=16, prompt_len_min=16, prompt_len_max=128, output_len=16)
             if quick else W1Config())  # fmt: skip
    raw: dict[str, Any] = {}
    for tp in tps:
        modes = dispatches if tp > 1 else (None,)
        raw[f"tp{tp}"] = {"W2": w2(env, tp, w2cfg, modes[0], profile_steps)}
        for extra in modes[1:]:
            raw[f"tp{tp}"][f"W2_{extra}"] = w2(env, tp, w2cfg, extra)
        if not skip_w1:
            _with_dispatch(modes[0])
            raw[f"tp{tp}"]["W1"] = w1(env, tp, w1cfg)
            _with_dispatch(None)
    ratios: dict[str, float] = {}
    base = tps[0]
    for tp in tps:
        r = raw[f"tp{tp}"]
        ratios[f"W2_itl_median_over_floor_tp{tp}"] = r["W2"]["itl_median_over_floor"]
        if "W1" in r:
            ratios[f"W1_wall_over_floor_tp{tp}"] = r["W1"]["wall_over_floor"]
            ratios[f"W1_output_tok_s_tp{tp}"] = r["W1"]["output_tok_s"]
        if tp != base:
            b = raw[f"tp{base}"]
            for key in [k for k in r if k.startswith("W2")]:
                ratios[f"{key}_itl_tp{tp}_over_tp{base}"] = (
                    r[key]["itl"]["median"] / b["W2"]["itl"]["median"]
                )
            if "W1" in r:
                ratios[f"W1_tok_s_tp{tp}_over_tp{base}"] = (
                    r["W1"]["output_tok_s"] / b["W1"]["output_tok_s"]
                )
    return {
        "config": {"model": model, "tp": tps, "W2": asdict(w2cfg), "W1": asdict(w1cfg)},
        "raw": raw,
        "ratios": ratios,
        "notes": {
            "floor": "n GPUs: each reads 1/n of the weights and KV at the measured copy rate "
            "(W2), and W1's floor with n × the copy and matmul rates; all-reduces not counted",
            "W2_itl_tpN_over_tp1": "median ITL at TP=N / at TP=1: goal <= 0.6 at N=2 (8B)",
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_tp", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="overhead,w8,70b")
    p.add_argument("--tp", default=None, help="TP sizes for w8 (default 1,2[,4])")
    p.add_argument("--tp70", default=None, help="TP sizes for 70b (default 2[,4])")
    p.add_argument("--quick", action="store_true", help="smoke test: 2-layer 8B shape, tiny sizes")
    p.add_argument("--out", type=Path)
    p.add_argument("--skip-w1", action="store_true", help="W2 only (batch-1 latency)")
    p.add_argument("--dispatch", default="calls",
                   help="TP>1 step dispatch modes for W2, comma-separated (the first also "
                   "runs W1): calls, compiled")  # fmt: skip
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many decode steps of W2 (rank 0's kernels by family)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="transformers")
    import ray
    import transformers

    from workers import peer_allreduce

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    log = Logger()
    n_gpu = torch.cuda.device_count()
    ray.init(include_dashboard=False, log_to_driver=False)
    device = torch.device("cuda", 0)
    ceilings = gpu_ceilings(device, torch.bfloat16, 256 * 1024**2 if args.quick else 2 * 1024**3,
                            4096 if args.quick else 8192)  # fmt: skip
    log(f"{n_gpu} GPUs; copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"matmul {ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    env_info = environment(device)
    out_dir = args.out or RESULTS_DIR
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    tps = [int(x) for x in args.tp.split(",")] if args.tp else [t for t in (1, 2, 4) if t <= n_gpu]
    tp70 = (
        [int(x) for x in args.tp70.split(",")] if args.tp70 else [t for t in (2, 4) if t <= n_gpu]
    )
    root = Path(tempfile.mkdtemp(prefix="kvserve-tp-"))
    model8 = "llama3-8b-shape-2l" if args.quick else "llama3-8b-shape"
    model70 = "llama3-8b-shape-2l" if args.quick else "llama3-70b-shape"
    modes = tuple(x.strip() for x in args.dispatch.split(",") if x.strip())

    def tp_part(model: str, sizes: list[int]) -> Any:
        return lambda: part_tp(model, sizes, ceilings, log, root, args.quick, args.skip_w1,
                               args.profile_steps, modes)  # fmt: skip

    jobs = {
        "overhead": ("TP-overhead", lambda: part_overhead(ceilings, log, root, args.quick)),
        "w8": ("W8", tp_part(model8, tps)),
        "70b": ("W8-70B", tp_part(model70, tp70)),
    }
    for part in parts:
        name, job = jobs[part]
        t0 = time.perf_counter()
        result = job()
        result.setdefault("config", {})["tp_allreduce"] = peer_allreduce.MODE
        if args.quick:
            name += "-quick"
        if peer_allreduce.MODE != "nccl":
            name += f"-{peer_allreduce.MODE}"
        path = write_result(out_dir, SUITE, name, env_info, ceilings, result)
        log(f"{name}: {result['ratios']} ({time.perf_counter() - t0:.0f} s) -> {path}")
    ray.shutdown()
    os._exit(0)  # Ray's and NCCL's threads can keep a clean exit waiting


if __name__ == "__main__":
    raise SystemExit(main())
