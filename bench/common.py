"""Result records, environment, measured ceilings and random prompts shared by every suite.

A result record (one JSON file per workload and run) holds: ``commit``, ``device``,
``versions``, ``ceilings`` (measured in the same run), ``config``, ``raw`` (every
figure measured), ``ratios`` (the claims) and ``notes`` (what each figure means).
Files go to ``bench/results/<YYYY-MM-DD>-<device-slug>-<workload>.json``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.netbind import free_port  # noqa: F401  (re-exported: runs and tests use it)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA_VERSION = 1
# Random prompt ids stay this far from both ends of the vocabulary (special tokens).
TOKEN_MARGIN = 100


# --- environment ------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@dataclass(frozen=True, slots=True)
class Sizes:
    """Workload configs and ceiling sizes of one mode of a suite (full, quick)."""

    configs: dict[str, Any]
    copy_bytes: int
    matmul_n: int


def git_commit() -> dict[str, Any]:
    """HEAD's hash and whether the working tree had uncommitted changes (None: unknown)."""
    if os.environ.get("KVSERVE_COMMIT"):
        # A copy of the tree (the GPU machines; its .git, if any, is not this tree's):
        # the caller names the commit.
        return {"sha": os.environ["KVSERVE_COMMIT"], "dirty": None, "source": "KVSERVE_COMMIT"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    sha = _run(["git", "rev-parse", "HEAD"])
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    """The CPU's model name (``lscpu``, then ``/proc/cpuinfo``, then ``platform``)."""
    text = _run(["lscpu"]) or ""
    m = re.search(r"^Model name:\s*(.+)$", text, re.M)
    if m:
        return m.group(1).strip()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return (
        m.group(1).strip() if m else (platform.processor() or platform.machine() or "unknown CPU")
    )


def device_info(device: torch.device) -> dict[str, Any]:
    """``kind``, ``name``, ``count`` (CPU: cores; GPU: devices), ``slug`` (for file names)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        count = torch.cuda.device_count()
        info: dict[str, Any] = {"kind": "cuda", "name": name, "count": count}
        slug_src = f"{name}-x{count}"
    else:
        name, count = cpu_name(), os.cpu_count() or 1
        info = {
            "kind": "cpu",
            "name": name,
            "count": count,
            "torch_threads": torch.get_num_threads(),
        }
        slug_src = f"cpu-{name}-{count}c"
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", slug_src.lower()).strip("-")
    return info


def versions() -> dict[str, str | None]:
    """Versions of what the figures depend on; ``None`` for a package that is absent."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "numpy", "kvserve"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch"] = torch.__version__  # the build actually imported (e.g. "+cpu")
    return out


# --- timing and ceilings --------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Waits for queued device work (a no-op on CPU) so ``perf_counter`` brackets it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(
    device: torch.device, dtype: torch.dtype, copy_bytes: int, matmul_n: int, reps: int = 5
) -> dict[str, Any]:
    """The hardware's practical limits, measured now (best of ``reps``, after a warm-up).

    ``copy_bytes_per_s``: a ``copy_bytes`` tensor copied into another, counting read +
    write (2 × bytes / time). ``matmul_flop_per_s``: an ``n × n`` by ``n × n`` matmul in
    ``dtype``, 2n³ FLOPs / time.
    """
    elem_size = torch.empty((), dtype=dtype).element_size()
    elems = copy_bytes // elem_size
    copy_bytes = elems * elem_size
    copy_times = _time_copy(device, dtype, elems, reps)
    mm_times = _time_matmul(device, dtype, matmul_n, reps)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bytes": copy_bytes,
        "copy_times_s": copy_times,
        "copy_bytes_per_s": 2 * copy_bytes / min(copy_times),
        "matmul_n": matmul_n,
        "matmul_times_s": mm_times,
        "matmul_flop_per_s": 2 * matmul_n**3 / min(mm_times),
    }


def _time_copy(device: torch.device, dtype: torch.dtype, elems: int, reps: int) -> list[float]:
    src = torch.ones(elems, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return _time_reps(lambda: dst.copy_(src), device, reps)


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> list[float]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _time_reps(lambda: torch.mm(a, b), device, reps)


def _time_reps(fn: Any, device: torch.device, reps: int) -> list[float]:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Sizes a floor is computed from.

    ``matmul_params``: parameters that take part in a matmul per token (all but the
    input embedding; the LM head counts even when tied). ``weight_bytes``: bytes a
    decode step must read (those parameters × dtype size). ``kv_bytes_per_token``:
    layers × 2 × kv_heads × head_dim × dtype size.
    """

    matmul_params: int
    weight_bytes: int
    kv_bytes_per_token: int

    @classmethod
    def from_hf(cls, model: Any, dtype_bytes: int) -> ModelFacts:
        cfg = model.config
        params = int(model.num_parameters(exclude_embeddings=True))
        head = model.get_output_embeddings()
        if head is not None and head.weight is model.get_input_embeddings().weight:
            params += cfg.vocab_size * cfg.hidden_size  # a tied LM head is not counted above
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_hidden_layers * 2 * heads * head_dim * dtype_bytes
        return cls(params, params * dtype_bytes, kv)

    def decode_floor_s(self, context_len: int, copy_bytes_per_s: float) -> float:
        """Least time of one batch-1 decode step attending to ``context_len`` positions:
        (weight bytes + KV bytes read) / measured copy rate."""
        return (self.weight_bytes + self.kv_bytes_per_token * context_len) / copy_bytes_per_s

    def compute_floor_s(self, tokens: int, matmul_flop_per_s: float) -> float:
        """Least time to push ``tokens`` through the weights: 2 × params × tokens / matmul
        rate (attention FLOPs left out, so a lower bound)."""
        return 2 * self.matmul_params * tokens / matmul_flop_per_s


# --- inputs and statistics --------------------------------------------------------------
def random_prompts(
    n: int, len_min: int, len_max: int, vocab_size: int, seed: int
) -> list[list[int]]:
    """``n`` prompts of random token ids: lengths uniform in [len_min, len_max], then the
    ids, in [100, vocab_size - 100) (no special tokens), all from one NumPy generator
    seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(len_min, len_max + 1, size=n).tolist()
    return [rng.integers(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN, size=k).tolist() for k in lengths]


def stats(xs: Sequence[float]) -> dict[str, float]:
    """median, p99, mean, min, max of ``xs`` (NaN when empty)."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return dict.fromkeys(("median", "p99", "mean", "min", "max"), float("nan"))
    return {
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy outputs share (a sanity figure, not a claim)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- records --------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """The parts of a record that are the same for every workload of one run."""
    return {"commit": git_commit(), "device": device_info(device), "versions": versions()}


def write_result(
    out_dir: Path,
    suite: str,
    workload: str,
    env: dict[str, Any],
    ceilings: dict[str, Any],
    result: dict[str, Any],
) -> Path:
    """Writes one record; ``result`` holds ``config``, ``raw``, ``ratios``, ``notes``."""
    now = dt.datetime.now().astimezone()
    record = {
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "workload": workload,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        **env,
        "ceilings": ceilings,
        **result,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['date']}-{env['device']['slug']}-{workload}.json"
    path.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    return path
