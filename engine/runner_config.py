"""What one model runner (one rank) is built from: the model, the cache and scheduler
limits, the device and dtype. Its own module so that the KV-cache planner
(``engine.kv_cache``) and the runner (``engine.model_runner``) both read it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import CacheConfig, ModelConfig, SchedulerConfig


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    model_dir: Path
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    attention_backend: str = "auto"
    load_format: str = (
        "auto"  # "auto": the checkpoint's weights; "dummy": seeded random (benchmarks)
    )
    seed: int = 0
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    fused_ops: bool = True  # Triton add+RMSNorm, SiLU·mul and rotary (GPU path only)
    # Token ids run once at start-up to set per-layer FP8 KV scales (empty: scales 1.0).
    kv_calibration_ids: tuple[int, ...] = ()
