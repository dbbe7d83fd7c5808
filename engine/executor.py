"""Executors: what runs a step's model forward on one or several ranks.

The engine talks to one ``Executor``; it never knows how many processes hold the
model. ``LocalExecutor`` runs rank 0 of 1 in this process. Other executors are
handed in (``LLMEngine(args, executor_class=...)``: a serving core passes
``workers.group.RayExecutor``) or found by name, as vLLM's
``distributed_executor_backend`` is, among the ``kvserve.executors`` entry points that
installed packages declare (``workers`` declares ``ray`` in ``pyproject.toml``), so
``engine`` never imports Ray or names ``workers``.

Contract of every executor:

- ``runner`` is the ``ModelRunner`` of rank 0, in this process: its logits are the
  ones the engine samples from.
- ``num_blocks`` is the KV block count every rank agreed on (the minimum of what
  each rank's memory allows); block ids mean the same slots on every rank.
  ``num_host_blocks`` is the same for the host tier (0: none).
- ``execute(out)`` runs one step on every rank in lockstep and returns rank 0's
  float32 logits of the sampling rows. A rank that fails or dies makes it raise
  (``RuntimeError`` naming the rank) within seconds; it never hangs.
- ``takes_device_tokens``: whether ``execute(out, prev_tokens)`` accepts ``PENDING``
  ids filled from the previous step's tokens on rank 0's device (async scheduling);
  an executor whose other ranks cannot see them says False and never gets any.
- ``shutdown()`` releases every rank; it is idempotent.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

import torch

from engine.model_runner import ModelRunner
from engine.runner_config import RunnerConfig
from engine.scheduler_output import SchedulerOutput

ENTRY_POINTS = "kvserve.executors"  # the entry-point group of named executors


class Executor(Protocol):
    runner: ModelRunner
    takes_device_tokens: bool

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_host_blocks(self) -> int: ...

    def execute(
        self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Tensor-parallel size 1: the runner in this process, no Ray, no process group."""

    takes_device_tokens = True

    def __init__(self, cfg: RunnerConfig, tensor_parallel_size: int = 1, **_: object) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("the local executor runs tensor_parallel_size=1 only; use 'ray'")
        self.runner = ModelRunner(cfg)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.runner.num_host_blocks

    def execute(
        self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.runner.execute(out, prev_tokens)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def executor_classes() -> dict[str, Any]:
    """Executor classes by name: ``local`` and every ``kvserve.executors`` entry point
    (loaded only when asked for)."""
    named: dict[str, Any] = {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}
    named["local"] = LocalExecutor
    return named


def make_executor(name: str | None, cfg: RunnerConfig, tensor_parallel_size: int,
                  timeout_s: float, executor_class: Any = None) -> Executor:  # fmt: skip
    """``executor_class`` (handed in), else the one named ``name`` (None: "local" at size
    1, "ray" above)."""
    if executor_class is None:
        name = name or ("local" if tensor_parallel_size == 1 else "ray")
        named = executor_classes()
        if name not in named:
            raise ValueError(f"distributed_executor_backend must be one of {sorted(named)}, "
                             f"got {name!r} (is the package that provides it installed?)")  # fmt: skip
        found = named[name]
        executor_class = found if found is LocalExecutor else found.load()
    executor: Executor = executor_class(cfg, tensor_parallel_size, timeout_s=timeout_s)
    return executor
