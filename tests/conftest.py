"""Shared fixtures: the default model (converted once per machine), tiny models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy), so their logic is
# tested on CPU too. Must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.factories import save_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Every CPU engine the suite starts (offline, in Serve replicas, in rank actors: Ray's
# workers inherit this environment) gets a 512 MiB KV cache unless a test sets its own
# size; at the 2 GiB default the suite's engines came close to the CI machine's 24 GiB.
os.environ.setdefault("KVSERVE_CPU_KV_CACHE_BYTES", str(512 * 1024**2))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from engine.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir: Path) -> Any:
    from engine import LLM

    return LLM(smollm2_dir, device="cpu", max_model_len=1024)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> HF directory of each tiny config (plus a sharded llama3 copy)."""
    from tests.factories import TINY_CONFIGS

    root = tmp_path_factory.mktemp("tiny")
    dirs = {name: save_tiny_model(name, root / name) for name in TINY_CONFIGS}
    dirs["llama3-sharded"] = save_tiny_model(
        "llama3", root / "llama3-sharded", max_shard_size="100KB"
    )
    return dirs


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    """A real local Ray for the session (8 logical CPUs: a CPU rank takes one, so a
    TP=4 group fits on the 2-core CI machine). Shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")  # fmt: skip
    yield ray
    ray.shutdown()
