"""What the GPU suite's workloads run against: the synthetic model, both engines, the
ceilings measured with CUDA events, and transformers' ``generate_batch`` peer.

Memory plan (an 8B model is 16 GB in bf16; an H100 has 80 GB). Never two big KV
caches at once:

- The HF peer (``sdpa`` attention, seeded random bf16 weights built on the GPU) is
  built once, before the first workload, and stays resident (16 GB) through W1-W4.
  W5 has no peer and drops it first, so the capacity figures are ours alone on the GPU.
- Our engine is built per workload, after the peer, with the workload's own settings
  (W1: ``max_num_seqs=256`` and the default ``gpu_memory_utilization=0.9``, whose budget
  is utilization × total minus every live tensor, the peer's weights included: ~38 GB
  of KV, more than W1's 22 GB peak; W2-W4: a small fixed pool via ``num_blocks`` and
  ``max_num_seqs=4``; W5: the default utilization on an otherwise empty GPU, eager).
- Each workload runs our part first, then frees our engine (``del``, ``gc.collect()``,
  ``torch.cuda.empty_cache()``) and runs the peer's part on a GPU holding only the peer:
  ``generate_batch`` sizes its paged cache from the memory free at that moment.
"""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import ModelFacts, measure_ceilings, random_prompts, sync
from bench.drivers import greedy, hf_generate
from bench.synthetic import Shape
from engine import LLM

# Tried in order: 5.17 takes "paged|sdpa" (refusing "sdpa_paged" and
# "paged|flex_attention"); newer releases take plain "sdpa" and page it themselves.
BATCH_ATTN_IMPLS = ("paged|sdpa", "sdpa")


class Logger:
    """Prints ``[elapsed s | wall clock] message``, flushed (stdout may be a pipe)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed:7.1f}s {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_ceilings(
    device: torch.device, dtype: torch.dtype, copy_bytes: int, matmul_n: int, reps: int = 10
) -> dict[str, Any]:
    """``common.measure_ceilings``'s figures timed with CUDA events, best of ``reps``
    after 3 warm-up runs: a ``copy_bytes`` device-to-device copy counting read + write
    (2 × bytes / time) and an ``n³`` ``torch.matmul`` (2n³ FLOPs / time). Off CUDA,
    ``measure_ceilings`` itself."""
    if device.type != "cuda":
        return {**measure_ceilings(device, dtype, copy_bytes, matmul_n), "timer": "perf_counter"}
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = copy_bytes // elem * elem
    copy_times = _copy_times(device, dtype, nbytes // elem, reps)
    mm_times = _matmul_times(device, dtype, matmul_n, reps)
    torch.cuda.empty_cache()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "timer": "cuda events",
        "copy_bytes": nbytes,
        "copy_times_s": copy_times,
        "copy_bytes_per_s": 2 * nbytes / min(copy_times),
        "matmul_n": matmul_n,
        "matmul_times_s": mm_times,
        "matmul_flop_per_s": 2 * matmul_n**3 / min(mm_times),
    }


def _copy_times(device: torch.device, dtype: torch.dtype, elems: int, reps: int) -> list[float]:
    src = torch.ones(elems, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return _event_times(lambda: dst.copy_(src), reps)


def _matmul_times(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> list[float]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _event_times(lambda: torch.matmul(a, b), reps)


def _event_times(fn: Callable[[], Any], reps: int) -> list[float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


@dataclass
class GPUEnv:
    """The model directory, its sizes, the ceilings; builds our engine on demand and
    holds the peer (built by ``peer()``, freed by ``drop_peer()``)."""

    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    config: Any  # the LlamaConfig
    ceilings: dict[str, Any]
    log: Logger
    seed: int = 0
    # Engine arguments that override every workload's own (``--engine-arg``).
    overrides: dict[str, Any] = field(default_factory=dict)
    # False (``--no-peer``): every workload records ``peer_error`` instead of timing HF.
    with_peer: bool = True
    _peer: Any = field(default=None, repr=False)

    @property
    def shape(self) -> Shape:
        return Shape.from_config(self.config)

    @property
    def facts(self) -> ModelFacts:
        return self.shape.facts(self.dtype.itemsize)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def pad_token_id(self) -> int:
        return int(self.config.eos_token_id or 0)

    def free(self) -> None:
        """Collects dropped engines and returns torch's cached blocks to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def memory(self) -> str:
        if self.device.type != "cuda":
            return "cpu"
        free, total = torch.cuda.mem_get_info(self.device)
        alloc = torch.cuda.memory_allocated(self.device)
        return (
            f"{alloc / 2**30:.1f} GiB allocated, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        )

    # --- our engine ------------------------------------------------------------------
    def ours(self, **engine_args: Any) -> LLM:
        """Our engine on the synthetic model, seeded random weights, warmed up."""
        t0 = time.perf_counter()
        engine_args = {**engine_args, **self.overrides}
        llm = LLM(
            self.model_dir, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            load_format="dummy", seed=self.seed, **engine_args,
        )  # fmt: skip
        plan = llm.engine.runner.plan
        weights = llm.engine.runner.weight_bytes
        expected = self.shape.total_params * self.dtype.itemsize
        tp = llm.engine.args.tensor_parallel_size
        if tp == 1 and weights != expected:
            self.log(f"WARNING: our weights are {weights} bytes, the shape says {expected}")
        warm_ours(llm, self.vocab_size)
        blocks = f"{plan.num_blocks} blocks" if plan is not None else "no KV cache"
        self.log(f"built + warmed kvserve {engine_args or ''} in {time.perf_counter() - t0:.1f}s "
                 f"({blocks}; {self.memory()})")  # fmt: skip
        return llm

    # --- the peer ----------------------------------------------------------------------
    def peer(self) -> Any:
        if not self.with_peer:
            raise PeerSkipped("the peer was not run (--no-peer)")
        if self._peer is None:
            t0 = time.perf_counter()
            self._peer = build_peer(self.config, self.device, self.dtype, self.seed)
            hf_generate(
                self._peer, self.device, self.pad_token_id, warm_prompts(self.vocab_size), 4
            )
            n = self._peer.num_parameters()
            if n != self.shape.total_params:
                self.log(
                    f"WARNING: HF has {n} parameters, the shape says {self.shape.total_params}"
                )
            self.log(f"built + warmed HF ({self._peer.config._attn_implementation}) in "
                     f"{time.perf_counter() - t0:.1f}s ({self.memory()})")  # fmt: skip
        return self._peer

    def drop_peer(self) -> None:
        if self._peer is not None:
            self._peer = None
            self.free()
            self.log(f"dropped HF ({self.memory()})")


class PeerSkipped(Exception):
    """``GPUEnv.peer`` under ``--no-peer``: a runner records it as its ``peer_error``."""


def warm_prompts(vocab_size: int, max_len: int = 300) -> list[list[int]]:
    """Warm-up prompts from their own seed (never a prefix of a timed prompt)."""
    return random_prompts(4, 16, max(16, max_len), vocab_size, seed=12345)


def warm_ours(llm: LLM, vocab_size: int) -> None:
    """A few mixed-length requests: compiles and runs the prefill and decode paths."""
    room = llm.engine.scheduler_config.max_model_len - 16
    llm.generate(warm_prompts(vocab_size, min(300, room)), greedy(8))
    llm.engine.reset_prefix_cache()


def build_peer(
    config: Any, device: torch.device, dtype: torch.dtype, seed: int, attn: str = "sdpa"
) -> Any:
    """transformers' Llama with seeded random weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def hf_generate_batch(
    model: Any,
    device: torch.device,
    prompts: list[list[int]],
    max_new: int,
    impls: tuple[str, ...] = BATCH_ATTN_IMPLS,
) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``) on token-id prompts, greedy,
    never stopping early (``eos_token_id=-1``). Tries each attention implementation of
    ``impls`` in turn, the model's own restored afterwards. Returns ``call_s`` (the whole
    call, its cache set-up included), ``span_s`` (first request created to last finished,
    from its own timestamps; None when absent), ``outputs`` (token ids, input order) and
    ``attn_implementation``; raises ``RuntimeError`` naming every failure."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)
    params = inspect.signature(model.generate_batch).parameters
    kwargs: dict[str, Any] = {"progress_bar": False} if "progress_bar" in params else {}
    original = model.config._attn_implementation
    errors = []
    for impl in impls:
        t0 = time.perf_counter()
        try:
            if impl != model.config._attn_implementation:
                model.set_attn_implementation(impl)
            # No inference_mode here: its worker thread updates tensors made by this one.
            out = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
            sync(device)
            call_s = time.perf_counter() - t0
            return {
                **_parse_batch(out, len(prompts)),
                "call_s": call_s,
                "attn_implementation": impl,
            }
        except Exception as e:  # a failing peer is recorded, never fatal
            errors.append(f"{impl}: {type(e).__name__}: {e}")
            if time.perf_counter() - t0 > 60:
                break  # it ran, then failed: retrying would cost as much again
        finally:
            if model.config._attn_implementation != original:
                model.set_attn_implementation(original)
    raise RuntimeError("generate_batch failed: " + " | ".join(errors))


def _parse_batch(out: Any, n: int) -> dict[str, Any]:
    results = list(out.values()) if isinstance(out, dict) else list(out)
    failed = [getattr(r, "error", None) for r in results if getattr(r, "error", None)]
    if len(results) != n or failed:
        raise RuntimeError(f"{len(results)} of {n} results, {len(failed)} failed: {failed[:3]}")
    created = [getattr(r, "created_time", None) for r in results]
    ends = [(getattr(r, "lifespan", None) or (-1, -1))[1] for r in results]
    span = None
    if all(isinstance(c, float) for c in created) and all(e > 0 for e in ends):
        span = max(ends) - min(c for c in created if c is not None)
    return {"outputs": [list(r.generated_tokens) for r in results], "span_s": span}
