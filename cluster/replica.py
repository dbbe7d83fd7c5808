"""A pool replica: one engine instance (over one worker group) as a Serve deployment.

It hosts its engine's core: ``AsyncEngine`` (the step loop on a thread) and a
``CoreServer`` on the replica's event loop, where API processes attach
(``cluster.core``). A request added there runs ``generate``: plain-dict deltas, one
per step that advanced it (``{"request_id", "prompt_tokens", "cached_tokens",
"finished", "kv", "choices": [{"index", "text", "token_ids", "logprobs",
"finish_reason"}]}``, only what is new in each), or one ``{"error"}`` for bad input.
An abort returns the request's blocks. A decode replica has a prefill replica compute
the prompt and send its K/V (``cluster.pd``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from cluster.async_engine import AsyncEngine
from cluster.config import Faults, PDConfig
from cluster.core.messages import FULL, Delta, Request
from cluster.core.server import CoreServer, Outbox, pump
from cluster.metrics import EngineMetrics, LoopLag, RequestTimer
from cluster.pd.decode import DecodeSide, kv_links
from cluster.pd.pairs import PairHealth
from cluster.pd.prefill import PrefillSide
from cluster.placement import affinity
from cluster.placement.ledger import get_ledger
from cluster.process import freeze_heap, serve_replica_id
from cluster.relay import engine_info, prompt_of, relay
from engine.config import EngineArgs
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


REPORT_PERIOD_S = 1.0


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


class EngineReplica(DecodeSide, PrefillSide):
    def __init__(self, engine_args: dict[str, Any], model_name: str, role: str = "both",
                 stream_interval_s: float = 0.0, prefill: Any = None,
                 max_live_requests: int = 1 << 30, core_host: str = "",
                 pd: PDConfig | None = None, faults: Faults | None = None,
                 gil_switch_interval_s: float | None = None) -> None:  # fmt: skip
        """``role``: "both" (colocated), "prefill" or "decode" (disaggregated pools; a
        decode replica gets the prefill pool's handle as ``prefill``).
        ``max_live_requests``: new requests beyond this many live ones are refused
        (HTTP 429). The colocated and decode roles take API processes on ``core_host``
        ("": this node's address) (``CoreServer``: its address goes into the ledger
        reports, its key to ``core_link``). ``pd``: the disaggregation settings;
        ``faults``: fault injection (tests). ``gil_switch_interval_s``: this process's
        (``ServeConfig`` documents it; None: Python's own)."""
        if role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {role!r}")
        if role == "decode" and prefill is None:
            raise ValueError("a decode replica needs the prefill pool's handle")
        self.model_name = model_name
        self.prefill_pool = prefill
        # Least time between two deltas of one stream after the first token (0: one per
        # step that advanced it).
        self.stream_interval_s = stream_interval_s
        self.role = role
        self.max_live_requests = max_live_requests
        self.submitted = 0
        self.replica_id = serve_replica_id()
        if gil_switch_interval_s:
            sys.setswitchinterval(min(sys.getswitchinterval(), gil_switch_interval_s))
        self.engine = AsyncEngine(EngineArgs(**engine_args), (faults or Faults()).step_delay_s)
        self.tokenizer = self.engine.engine.tokenizer
        self.max_model_len = self.engine.engine.scheduler_config.max_model_len
        self.metrics = EngineMetrics(model_name, self.replica_id)
        self.links = None
        self.pd = pd or PDConfig()
        self.faults = faults or Faults()
        q = self.pd.pair_quarantine_s
        self.pairs = PairHealth(self.pd.pair_max_failures, q, max(q, 300.0))
        self._faults_left = self.faults.fail_prefills
        if role != "both":
            self.links = kv_links(self.replica_id, _node_ip(), self.engine)
        self._stop = threading.Event()
        self._lag = LoopLag()
        # The API processes' links (not the prefill role's: decode replicas call it).
        host = core_host or _node_ip()
        self.server = CoreServer(host, self) if role != "prefill" else None
        loop = _running_loop()
        if loop is not None:
            self._lag.start(loop)
            if self.server is not None:
                self.server.start()
        self._reporter = threading.Thread(target=self._report_loop, name="kvserve-report",
                                          daemon=True)  # fmt: skip
        self._reporter.start()
        freeze_heap()  # the libraries, the tokenizer and an engine in this process

    def _report_loop(self) -> None:
        """Every second: metrics gauges/counters and a ledger report."""
        import ray

        ledger = None
        last: Any = None  # the previous report: a failed one means a new ledger handle
        while True:  # the first report at once: API processes attach by the ledger rows
            stats = {**self.engine.stats(), **self._stream_stats(), **self._lag.stats(),
                     "dead": not self._healthy()}  # fmt: skip
            if self.server is not None:  # API processes attach there (cluster.api)
                stats["core"] = self.server.address
            try:  # the ledger first: placement and ``kvserve status`` read it
                if last is not None and ray.wait([last], timeout=0)[0]:
                    ray.get(last)
                ledger = ledger or get_ledger()
                last = ledger.report.remote(self.replica_id, {**stats, "role": self.role,
                                                              "model": self.model_name})  # fmt: skip
            except Exception as e:  # the ledger is advisory: serving goes on without it
                logger.warning("ledger report failed: %s", e)
                ledger, last = None, None
            try:
                self.metrics.sample(stats)
            except Exception as e:  # metrics are advisory too: the reports go on
                logger.warning("metrics sample failed: %s", e)
            if self._stop.wait(REPORT_PERIOD_S):
                return

    def _healthy(self) -> bool:
        """False once the engine's step loop or its worker group failed (a rank actor that
        died is seen by the group's watchdog within a second, even while idle)."""
        try:
            self.engine.check_health()
        except Exception:
            return False
        return True

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # None: the constructor failed before it
        if stop is not None:
            stop.set()
        server = getattr(self, "server", None)
        if server is not None:
            server.close()

    async def info(self) -> dict[str, Any]:
        """The served model, its context, and how this engine hashes prefix blocks
        (``cluster.relay.engine_info``)."""
        return engine_info(self.model_name, self.role, self.engine.engine)

    async def stats(self, target: str = "") -> dict[str, Any]:
        """This instance's figures. ``target``: the replica meant (the request router
        sends it there); another replica refuses (that one is gone)."""
        self._check_target(target)
        links = self.links
        extra: dict[str, Any] = {} if links is None else {"kv_bytes_sent": links.bytes_sent,
                                          "kv_bytes_received": links.bytes_received,
                                          "kv_link_failures": links.failures,
                                          "pair_quarantines": self.pairs.quarantines_total,
                                          "pairs": self.pairs.snapshot(time.monotonic())}  # fmt: skip
        names = getattr(self.engine.engine.executor, "rank_actor_names", None)
        if names is not None:  # (namespace, name) of the rank actors (TP > 1)
            extra["rank_actors"] = names()
        return {**self.engine.stats(), **self._stream_stats(), "instance": self.replica_id,
                "role": self.role, "dead": not self._healthy(), **extra}  # fmt: skip

    async def core_link(self, target: str = "") -> dict[str, Any]:
        """Where and with which key an API process attaches to this replica's engine
        core (``cluster.core.client.CoreLink``); ``target`` as for ``stats``.
        ``ValueError`` for a prefill replica (only decode replicas call it)."""
        self._check_target(target)
        if self.server is None:
            raise ValueError(f"engine instance {self.replica_id} takes no API processes")
        return {"address": self.server.address, "authkey": self.server.key.hex()}

    def _check_target(self, target: str) -> None:
        """A call pinned to ``target`` (``cluster.request_router``) that reached another
        replica: that instance is gone."""
        if target and target != self.replica_id:
            raise RuntimeError(f"engine instance {target} is gone (this is {self.replica_id})")

    def _stream_stats(self) -> dict[str, int]:
        server = self.server
        return {"submitted": self.submitted, "live": self._live(),
                "link_messages": server.messages if server else 0,
                "link_deltas": server.deltas if server else 0}  # fmt: skip

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``cluster.placement.autoscale.kv_aware_policy`` scales on (Serve collects it)."""
        return self._load()

    def record_routing_stats(self) -> dict[str, Any]:
        """What ``cluster.request_router`` places new requests by (Serve collects it):
        the load, and the prefix-cache blocks held (``cluster.placement.affinity``)."""
        return {**self._load(), "prefix": self.prefix_report()}

    def _load(self) -> dict[str, float]:
        """``kv_usage`` here is the KV demand: blocks held plus the decode blocks the
        admitted requests may still take (``engine.kv_budget``), what admission counts."""
        s = self.engine.stats()
        load = {k: float(s[k]) for k in ("waiting", "running", "free_blocks")}
        return {**load, "kv_usage": float(s["kv_demand"])}

    async def check_health(self) -> None:
        """Serve's health check: a dead engine (or worker group) fails it."""
        self.engine.check_health()

    # --- the core's links (cluster.core.server) ------------------------------------------
    def _live(self) -> int:
        return 0 if self.server is None else self.server.live()

    def link_info(self) -> dict[str, Any]:
        """What an attaching API process learns of this core (``info``)."""
        return {**engine_info(self.model_name, self.role, self.engine.engine),
                "instance": self.replica_id}  # fmt: skip

    def link_stats(self) -> dict[str, Any]:
        """The figures every message on a link carries (placement's load)."""
        return {**self.engine.stats(), "live": self._live()}

    def prefix_report(self) -> list[int]:
        """The prefix-cache blocks held (short hashes: ``cluster.placement.affinity``)."""
        return [affinity.short(h) for h in self.engine.prefix_hashes(affinity.REPORT_MAX)]

    async def reset_prefix_cache(self, target: str = "") -> dict[str, int]:
        """Empties this instance's prefix cache of blocks no request holds, and a decode
        instance's prefill pool's (``DecodeSide.reset_prefill_pool``); the cached blocks
        each instance forgot. ``target`` as for ``stats``."""
        self._check_target(target)
        pool = await self.reset_prefill_pool() if self.role == "decode" else {}
        return {self.replica_id: await self.engine.reset_prefix_cache(), **pool}

    def start(self, req: Request, box: Outbox) -> str | None:
        """Starts an API process's request (``request_id`` set); its deltas go to ``box``.
        None, or why it is refused (``"full: ..."``: ``max_live_requests`` live). A
        dead engine raises (the API process tries another core)."""
        self.engine.check_health()
        if self._live() >= self.max_live_requests:
            return (f"{FULL}engine instance {self.replica_id} has {self.max_live_requests} "
                    "requests; retry shortly")  # fmt: skip
        rid = str(req["request_id"])
        req["submitted_at"] = time.monotonic()  # this process's clock (timing_ms)
        box.tasks[rid] = asyncio.ensure_future(pump(rid, self.generate(req), box))
        self.submitted += 1
        return None

    async def generate(self, req: Request) -> AsyncGenerator[Delta, None]:
        params: SamplingParams = req["params"]
        arrival = time.monotonic()
        try:
            prompt = prompt_of(req, self.engine.engine)
            kv: dict[str, Any] = {"instance": self.replica_id}
            rid = req.get("request_id") or self.engine.new_request_id()
            resume = [int(t) for t in req.get("resume") or ()]
            if resume:  # a failover after tokens were sent (cluster.api.server)
                kv.update({"mode": "resumed", "resumed_tokens": len(resume)})
                stream = self.engine.generate(prompt, params, rid, resume)
            elif self.role == "decode":
                stream = self._disaggregated(prompt, params, rid, kv)
            else:
                stream = self.engine.generate(prompt, params, rid)
            first = await anext(stream)
        except ValueError as e:
            yield {"request_id": req.get("request_id", ""), "error": str(e)}
            return
        # A resumed request's outputs carry what the client has already (its tokens, and
        # text up to ``resume_text``): send only what follows.
        sent = {0: (int(req.get("resume_text", 0)), len(resume))} if resume else {}
        timer = RequestTimer(self.metrics, arrival)
        async with contextlib.aclosing(relay(stream, first, req, kv, timer, self.tokenizer,
                                             self.stream_interval_s, sent)) as deltas:  # fmt: skip
            async for delta in deltas:
                yield delta


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this runs on (Serve constructs a replica on its user-code loop,
    where its requests run too), or None (the lag probe runs there)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


EngineDeployment: Any = serve.deployment(name="engine")(EngineReplica)
