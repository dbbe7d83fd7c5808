"""The README's serving command on its own Ray: ``kvserve serve`` comes up on CPU with
SmolLM2, answers a chat request through its HTTP API, and stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import free_port


@pytest.mark.slow
def test_kvserve_serve_answers_a_chat(smollm2_dir: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--device", "cpu", "--max-model-len",
           "1024", "--port", str(free_port()), "--chat", "What is the capital of France?",
           "--exit"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "kvserve is up" in out.stdout
    assert "Paris" in out.stdout


def test_plan_shows_the_formula() -> None:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", "--model", "llama3-8b-shape",
                          "--tp", "2", "--gpu-memory-gib", "80"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "32 layers × 2 × 4 kv heads × 128 head_dim × 2 B = 65,536 B" in out.stdout
    assert "sessions of 8,192 tokens" in out.stdout
