"""One tensor-parallel rank in its own process: the body of a Ray actor.

The driving process (rank 0) creates ranks 1..N-1 as actors, then every rank builds
its ``ModelRunner`` with its shard of the weights and the KV cache of its head group.
``execute`` runs the step the driver's scheduler described; its logits are dropped,
since only rank 0 samples. Calls from the driver run in submission order, so ranks
stay in lockstep.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from dataclasses import replace
from typing import Any

import ray
import torch

from engine.model_runner import ModelRunner
from engine.parallel import TPContext
from engine.runner_config import RunnerConfig
from engine.scheduler_output import SchedulerOutput
from workers.comm import tcp_store, tp_group
from workers.kv_routes import RankChannels, Route
from workers.kv_transfer import synced

logger = logging.getLogger(__name__)


# Ray concurrency groups of a rank actor: KV transfers (disaggregated pools) run on
# their own threads, beside the steps, which keep the default group to themselves.
CONCURRENCY_GROUPS = {"kv": 4}


class RankWorker:
    def __init__(self, rank: int, size: int) -> None:
        # ``kill -USR1 <pid>`` prints every thread's stack to the actor's log.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.rank = rank
        self.size = size
        self.runner: ModelRunner | None = None
        self.exit_on_error = False
        self._kv: dict[str, RankChannels] = {}  # this rank's channels, by link (GroupChannel)

    def placement(self) -> dict[str, Any]:
        """Where Ray put this rank: node, process, GPU ids (physical, as Ray numbers them)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
        }

    def init_runner(
        self, cfg: RunnerConfig, store_path: str, backend: str, timeout_s: float, threads: int
    ) -> int:
        """Joins the group and builds this rank's runner; returns its agreed block count."""
        if cfg.device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray shows this actor its one GPU
            torch.cuda.set_device(device)
            cfg = replace(cfg, device=device)
        else:
            torch.set_num_threads(threads)
        group, peer = tp_group(store_path, self.rank, self.size, backend, timeout_s, cfg.device,
                               cfg.dtype)  # fmt: skip
        self.runner = ModelRunner(cfg, TPContext(self.rank, self.size, group, peer))
        return self.runner.num_blocks

    def execute(self, out: SchedulerOutput) -> None:
        """Runs one step. A failure leaves rank 0 waiting in a collective this rank never
        joins: with actor calls the exception reaches the driver's watchdog, which stops
        the group; under a compiled graph (``exit_on_error``) nobody reads it until the
        next step, so the rank logs it and exits, and the watchdog sees a death."""
        assert self.runner is not None, "init_runner first"
        try:
            self.runner.execute(out)
        except BaseException:
            if not self.exit_on_error:
                raise
            logger.exception("tensor-parallel rank %d failed a step; exiting", self.rank)
            logging.shutdown()
            os._exit(70)

    def set_exit_on_error(self, value: bool) -> None:
        self.exit_on_error = value

    def block(self) -> None:
        """Never returns: while a compiled graph runs the steps (on its own thread), the
        driver keeps one of these pending per actor; it fails only when the actor dies."""
        threading.Event().wait()

    def ping(self) -> int:
        return os.getpid()

    # --- KV transfer (workers.kv_routes.GroupChannel) ----------------------------------
    @ray.method(concurrency_group="kv")
    def kv_join(self, key: str, host: str, port: int, role: int, routes: list[Route],
                backend: str, timeout_s: float) -> None:  # fmt: skip
        """Joins this rank's channels of link ``key`` (its ``routes``) through the store
        at ``host:port``."""
        store = tcp_store(host, port, False, 2, timeout_s)
        self._kv[key] = RankChannels(store, role, self.rank, routes, backend, timeout_s)

    @ray.method(concurrency_group="kv")
    def kv_move(self, key: str, send: bool, block_ids: list[int]) -> int:
        """Sends (or receives) ``block_ids`` of this rank's cache on link ``key``; bytes."""
        assert self.runner is not None, "init_runner first"
        channel = self._kv.get(key)
        if channel is None:
            raise RuntimeError(f"rank {self.rank} has no KV channel {key}")
        return synced(channel.send if send else channel.recv, self.runner.kv_caches, block_ids)

    @ray.method(concurrency_group="kv")
    def kv_close(self, key: str) -> None:
        channel = self._kv.pop(key, None)
        if channel is not None:
            channel.close()
