"""A tensor-parallel worker group on Ray, driven from the engine's process.

Rank 0 runs in the driving process (the offline ``LLM``, or a Serve replica), next to
the scheduler and sampler, so its logits never cross a process boundary. Ranks 1..N-1
are ``RankWorker`` actors placed in a ``STRICT_PACK`` placement group (one bundle per
GPU, or one CPU each on CPU), bundle 0 pinned to the driver's node and left to it.

Each step the driver submits ``execute(out)`` to every actor without waiting, then
runs its own shard; the collectives inside the forward keep the ranks in lockstep.
A watchdog thread watches the actors' step results: a rank that raises or dies gets
the whole group killed at once, which breaks the collectives the driver is waiting
in (gloo sees its peers' sockets close; NCCL is aborted), so the step raises
``WorkerGroupError`` naming the rank within seconds instead of hanging.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.model_runner import ModelRunner
from engine.parallel import TPContext
from engine.runner_config import RunnerConfig
from engine.scheduler_output import SchedulerOutput
from workers.comm import abort_group, new_store_path, retire_group, tp_group
from workers.rank_worker import CONCURRENCY_GROUPS, RankWorker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0
# A group that cannot be placed at once is checked for engines of this process that hold
# theirs (dropped ones are collected first) after this long: then it fails at once.
HELD_CHECK_S = 2.0
# This process's live groups (weakly: a dropped engine's group leaves it when collected),
# named in the error of a group that cannot be placed while they hold the resources.
_LIVE: weakref.WeakSet[RayExecutor] = weakref.WeakSet()
# A rank died and rank 0's GPU may sit in an NCCL kernel waiting for it: aborting the
# communicator is the only way out, and if even that does not return in this time the
# process exits (a C-level timer: works while the GIL is held) rather than hang.
NCCL_ABORT_DEADLINE_S = float(os.environ.get("KVSERVE_NCCL_ABORT_DEADLINE_S", "15"))
# How each step reaches ranks 1..N-1: an actor call each (``calls``), or one execution
# of a Ray Compiled Graph over all of them (``compiled``: shared-memory channels that
# the actors poll, a fraction of a call's delivery latency; see docs/workers.md).
DISPATCH_MODES = ("calls", "compiled")


class WorkerGroupError(RuntimeError):
    """A rank of the tensor-parallel group failed; the group is unusable until rebuilt."""


class RayExecutor:
    """``engine.executor.Executor`` over ``tensor_parallel_size`` ranks (see module doc).

    ``placement_group``: an existing group whose bundle 0 holds this process (a Serve
    replica's ``placement_group_bundles``); ranks r >= 1 go to bundle r. None: the
    executor creates one and removes it on ``shutdown``.
    """

    takes_device_tokens = False  # every rank builds its inputs from the host's ids

    def __init__(
        self,
        cfg: RunnerConfig,
        tensor_parallel_size: int,
        timeout_s: float = 300.0,
        placement_group: PlacementGroup | None = None,
        dispatch: str | None = None,
    ) -> None:
        self.size = tensor_parallel_size
        self.dispatch = dispatch or os.environ.get("KVSERVE_TP_DISPATCH", "compiled")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        self._dag: Any = None  # the compiled graph (dispatch="compiled")
        self._liveness: list[Any] = []  # its never-returning block() calls, one per actor
        self._pids: list[int] = []
        self._inflight: list[Any] = []  # its refs of the last step
        self.gpu = cfg.device.type == "cuda"
        self.backend = "nccl" if self.gpu else "gloo"
        self._actors: list[Any] = []
        # Rank r's actor is named ``{name}-r{r}`` in this job's namespace (operators and
        # tests find a group's actors by it: ``rank_actor_names``).
        self.name = f"kvserve-rank-{uuid.uuid4().hex[:12]}"
        self._pg = placement_group
        self._own_pg = placement_group is None
        self._group: Any = None
        self._peer: Any = None  # PeerAllReduce of rank 0, when on
        self._failure: WorkerGroupError | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.dispatch_s = 0.0  # time spent submitting steps to the actors
        self.steps = 0
        _ensure_ray(self.size, self.gpu)
        # A weak reference: the watchdog's thread must not keep a dropped engine alive
        # (its finalizer then releases the placement group and the rank actors).
        self._watchdog = _Watchdog(weakref.WeakMethod(self._on_rank_failure))
        try:
            self._start(cfg, timeout_s)
        except BaseException as e:
            failure = self._failure
            self.shutdown()
            if failure is not None and not isinstance(e, WorkerGroupError):
                raise failure from e
            raise
        self._finalizer = weakref.finalize(self, _release, list(self._actors), self._owned_pg(),
                                           self._watchdog, self._dag)  # fmt: skip
        _LIVE.add(self)

    # --- start-up ---------------------------------------------------------------------
    def _start(self, cfg: RunnerConfig, timeout_s: float) -> None:
        if self._pg is None:
            # Inside a Serve replica with placement_group_bundles: bundle 0 is the
            # replica (rank 0), ranks r >= 1 take bundle r.
            current = ray.util.get_current_placement_group()
            if current is not None and len(current.bundle_specs) >= self.size:
                self._pg, self._own_pg = current, False
            else:
                self._pg = self._create_placement_group()
        cpu_threads = max(1, (os.cpu_count() or 1) // self.size)
        worker_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RankWorker)  # type: ignore[call-overload]
        for rank in range(1, self.size):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank)
            cpus = float(self._pg.bundle_specs[rank].get("CPU", 0.0))  # the bundle's share
            actor = worker_cls.options(  # type: ignore[attr-defined]
                num_cpus=cpus, num_gpus=1 if self.gpu else 0, max_restarts=0,
                scheduling_strategy=strategy, name=f"{self.name}-r{rank}",
            ).remote(rank, self.size)  # fmt: skip
            self._actors.append(actor)
        placements = ray.get([a.placement.remote() for a in self._actors], timeout=timeout_s)
        self._pids = [int(p["pid"]) for p in placements]
        device = self._driver_device(cfg, placements)
        if self.gpu:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(min(torch.get_num_threads(), cpu_threads))
        store = new_store_path()
        init_refs = [
            a.init_runner.remote(cfg, store, self.backend, timeout_s, cpu_threads)
            for a in self._actors
        ]
        self._watchdog.watch(list(enumerate(init_refs, start=1)))
        self._watchdog.start()
        t0 = time.perf_counter()
        try:
            self._group, self._peer = tp_group(store, 0, self.size, self.backend, timeout_s,
                                               device, cfg.dtype)  # fmt: skip
            self.runner = ModelRunner(
                replace(cfg, device=device), TPContext(0, self.size, self._group, self._peer)
            )
        except Exception as e:
            raise self._failure_after(e) from e
        counts = ray.get(init_refs, timeout=timeout_s)
        if self._failure is not None:
            raise self._failure
        if any(c != self.runner.num_blocks for c in counts):
            raise WorkerGroupError(
                f"ranks disagree on the KV block count: {[self.runner.num_blocks, *counts]}"
            )
        logger.info("tensor-parallel group of %d (%s) up in %.1f s; rank 0 on %s, ranks 1.. pids %s",
                    self.size, self.backend, time.perf_counter() - t0, device,
                    [p["pid"] for p in placements])  # fmt: skip
        with contextlib.suppress(OSError):
            os.unlink(store)  # every rank has joined; the store is not read again
        if self.dispatch == "compiled" and self._actors:
            self._compile()

    def _compile(self) -> None:
        """Builds the step graph, and leaves one never-returning ``block`` call pending on
        every actor: it resolves (with an error) only when the actor dies (liveness)."""
        from ray.dag import InputNode, MultiOutputNode

        ray.get([a.set_exit_on_error.remote(True) for a in self._actors])
        with InputNode() as step:
            dag = MultiOutputNode([a.execute.bind(step) for a in self._actors])
        self._dag = dag.experimental_compile()
        self._liveness = [a.block.remote() for a in self._actors]
        self._watchdog.watch(list(enumerate(self._liveness, start=1)))

    def _create_placement_group(self) -> PlacementGroup:
        need = "GPU" if self.gpu else "CPU"
        have = ray.cluster_resources().get(need, 0)
        if have < self.size:
            raise ValueError(
                f"tensor_parallel_size={self.size} needs {self.size} {need}s on one node; "
                f"the Ray cluster has {have:g}"
            )
        bundle = {"CPU": 1.0, "GPU": 1.0} if self.gpu else {"CPU": 1.0}
        bundles = [dict(bundle) for _ in range(self.size)]
        bundles[0][f"node:{ray.util.get_node_ip_address()}"] = 0.001  # rank 0 is this process
        pg = placement_group(bundles, strategy="STRICT_PACK")
        if not _ready(pg, HELD_CHECK_S):
            gc.collect()  # engines dropped in a reference cycle release their groups now
            holders = [e.name for e in list(_LIVE) if not e._closed and e._own_pg]
            if holders and not _ready(pg, HELD_CHECK_S):
                remove_placement_group(pg)
                raise RuntimeError(
                    f"tensor_parallel_size={self.size} needs {self.size} bundles of {bundle} "
                    f"on one node, and {len(holders)} other tensor-parallel engine(s) of this "
                    f"process still hold theirs ({', '.join(holders)}): shut each down "
                    "(LLM.shutdown(), or `with LLM(...) as llm:`) or drop every reference "
                    "to it (`del llm`) before building the next"
                )
            if not _ready(pg, PLACEMENT_TIMEOUT_S):
                remove_placement_group(pg)
                raise RuntimeError(
                    f"could not place {self.size} bundles of {bundle} on this node within "
                    f"{PLACEMENT_TIMEOUT_S:.0f} s (STRICT_PACK); free resources: "
                    f"{ray.available_resources()}"
                )
        return pg

    def _driver_device(self, cfg: RunnerConfig, placements: list[dict[str, Any]]) -> torch.device:
        """CPU, or the GPU of bundle 0: this process's own GPU inside a Ray worker, else
        the first GPU of the node that no rank actor took."""
        if not self.gpu:
            return torch.device("cpu")
        own = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        if ray.get_runtime_context().get_actor_id() is not None and own:
            return torch.device("cuda", 0)
        taken = {g for p in placements for g in p["gpu_ids"]}
        free = [i for i in range(torch.cuda.device_count()) if str(i) not in taken]
        if not free:
            raise RuntimeError(f"no GPU left for rank 0: the rank actors hold {sorted(taken)}")
        return torch.device("cuda", free[0])

    def _owned_pg(self) -> PlacementGroup | None:
        return self._pg if self._own_pg else None

    # --- the step ---------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.runner.num_host_blocks

    def execute(
        self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``prev_tokens`` is never given (``takes_device_tokens`` is False): the other
        ranks could not read rank 0's device tokens."""
        assert prev_tokens is None and not out.pending_sources
        self.check_health()
        t0 = time.perf_counter()
        if self._dag is not None:
            self._collect_inflight()
            try:  # a rank that died tears the graph down: its channels close
                self._inflight = self._dag.execute(out)
            except Exception as e:
                raise self._failure_after(e) from e
        else:
            refs = [a.execute.remote(out) for a in self._actors]
            self._watchdog.watch(list(enumerate(refs, start=1)))
        self.dispatch_s += time.perf_counter() - t0
        self.steps += 1
        try:
            return self.runner.execute(out)
        except Exception as e:
            raise self._failure_after(e) from e

    def _collect_inflight(self) -> None:
        """Reads the previous step's results from the compiled graph (done by now: the
        collectives of that step finished on rank 0); a rank's error fails the group."""
        for rank, ref in enumerate(self._inflight, start=1):
            try:
                ray.get(ref, timeout=30)
            except Exception as e:
                self._on_rank_failure(rank, e)
                raise self._failure_after(e) from e
        self._inflight = []

    def rank_actors(self) -> list[Any]:
        """The actor handles of ranks 1..size-1 (for KV transfers: ``kv_*`` methods)."""
        return list(self._actors)

    def rank_actor_names(self) -> list[tuple[str, str]]:
        """(namespace, name) of the actors of ranks 1..size-1."""
        ns = ray.get_runtime_context().namespace
        return [(ns, f"{self.name}-r{r}") for r in range(1, self.size)]

    def check_health(self) -> None:
        """Raises the group's failure, if one happened (cheap: reads a field)."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise WorkerGroupError("the worker group was shut down")

    def ping(self, timeout_s: float = 5.0) -> list[int]:
        """Every actor's pid; raises WorkerGroupError if one does not answer. Under a
        compiled graph the actors take no calls: a rank is alive while its pending
        ``block`` call is (it resolves only when the actor dies)."""
        self.check_health()
        if self._dag is not None:
            ready, _ = ray.wait(self._liveness, num_returns=len(self._liveness), timeout=0)
            if ready:
                raise WorkerGroupError(f"{len(ready)} rank(s) of {self.size} are gone")
            return list(self._pids)
        try:
            return ray.get([a.ping.remote() for a in self._actors], timeout=timeout_s)
        except Exception as e:
            raise WorkerGroupError(f"a rank did not answer a ping: {e}") from e

    def _failure_after(self, err: BaseException, wait_s: float = 10.0) -> WorkerGroupError:
        """The cause of a failed collective on rank 0: a rank's failure if the watchdog
        sees one within ``wait_s``, else rank 0's own error. Kills the group."""
        deadline = time.monotonic() + wait_s
        while self._failure is None and time.monotonic() < deadline and self._actors:
            time.sleep(0.02)
        if self._failure is None:
            self._on_rank_failure(0, err)
        assert self._failure is not None
        return self._failure

    def _on_rank_failure(self, rank: int, err: BaseException) -> None:
        with self._lock:
            if self._failure is not None:
                return
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            died = isinstance(
                err, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError
            )
            what = "died" if died else f"failed ({type(err).__name__})"
            self._failure = WorkerGroupError(
                f"tensor-parallel rank {rank} of {self.size} {what}: {first_line[:300]}; "
                "the group is stopped (shut the engine down and start a new one)"
            )
        logger.error("%s", self._failure)
        # Killing every rank breaks the collectives that the others wait in.
        for a in self._actors:
            ray.kill(a, no_restart=True)
        if self._group is not None and self.backend == "nccl":
            _abort_nccl_or_exit(self._group, str(self._failure))

    # --- teardown ---------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watchdog.stop()
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            _release(self._actors, self._owned_pg(), self._watchdog, self._dag)
        if self._peer is not None:
            self._peer.close()
        if self._group is not None:
            retire_group(self._group, abort=self.backend == "gloo")


def _abort_nccl_or_exit(group: Any, why: str) -> None:
    """Aborts ``group``'s NCCL communicator (wakes rank 0's pending collectives); if the
    abort has not returned within ``NCCL_ABORT_DEADLINE_S`` the process prints every
    thread's stack and exits with status 1: a rank's death must never hang the engine
    (a Serve replica is then replaced by Serve; an offline caller sees the exit)."""
    import faulthandler
    import sys

    logger.error("aborting the NCCL group (%s); if the abort does not return within %.0f s "
                 "this process exits", why, NCCL_ABORT_DEADLINE_S)  # fmt: skip
    print(f"kvserve: {why}; aborting NCCL (process exits if that takes over "
          f"{NCCL_ABORT_DEADLINE_S:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    faulthandler.dump_traceback_later(NCCL_ABORT_DEADLINE_S, exit=True)
    try:
        abort_group(group)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _ready(pg: PlacementGroup, timeout_s: float) -> bool:
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return False
    return True


def _release(actors: list[Any], pg: PlacementGroup | None, watchdog: _Watchdog | None = None,
             dag: Any = None) -> None:  # fmt: skip
    """Everything a group holds: its watchdog, its rank actors (before the compiled
    graph: their main thread sits in ``block``, so the graph's own cancel call would wait
    for its timeout; dead actors tear down at once), the graph, its placement group."""
    if watchdog is not None:
        watchdog.stop()
    for a in actors:
        with contextlib.suppress(Exception):  # already gone, or Ray shut down
            ray.kill(a, no_restart=True)
    if dag is not None:
        with contextlib.suppress(Exception):
            dag.teardown(kill_actors=True)
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def _ensure_ray(size: int, gpu: bool) -> None:
    """Connects to ``RAY_ADDRESS`` or starts a local Ray on loopback (on CPU with at least
    one logical CPU per rank, so a small machine can still run a CPU group)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    elif gpu:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, size), include_dashboard=False,
                 _node_ip_address="127.0.0.1")  # fmt: skip


class _Watchdog(threading.Thread):
    """Waits on the actors' pending calls; reports the first error (or death) to
    ``on_failure()`` (a ``WeakMethod``: nothing once its group is gone)."""

    def __init__(self, on_failure: Any) -> None:
        super().__init__(name="kvserve-tp-watchdog", daemon=True)
        self._on_failure = on_failure
        self._pending: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    def watch(self, ranked_refs: list[tuple[int, Any]]) -> None:
        with self._lock:
            for rank, ref in ranked_refs:
                self._pending[ref] = rank
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                refs = list(self._pending)
            if not refs:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2, fetch_local=False)
            for ref in ready:
                with self._lock:
                    rank = self._pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # any failure of a rank is reported
                    on_failure = self._on_failure()  # None: the group was dropped
                    if not self._stop.is_set() and on_failure is not None:
                        on_failure(rank, e)
                    self._stop.set()
                    return
