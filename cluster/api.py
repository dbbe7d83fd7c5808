"""API processes attached to the engine cores (``ServeConfig.ingress = "api"``).

At many concurrent streams one event loop is what a request waits for: its HTTP
parse, admission and every other stream's per-token events run there one after
another, and closed-loop clients send their next requests in waves
(docs/serving.md). This ingress divides that work: ``api_replicas`` Serve replicas
(HAProxy spreads connections over them) each run ``cluster.front``'s routes, and each
talks to the engine cores straight over a connection of its own
(``cluster.engine_process.attach``), with no Ray call per request or per token:

    client ─▶ HAProxy ─▶ api replica 1..K ──TCP (pickled deltas)──▶ engine core
                                                                   (child process of
                                                                    an engine replica)

The engine replicas (``cluster.replica.EngineReplica`` with ``api_links``) start their
cores listening on their host, publish the address in the ledger, and hand the key to
an API replica that asks (``core_link``, a Serve call pinned to that replica). Each API
replica attaches to every live core it finds there (a thread, once a second) and sends
each request to the core with the least load (its own live requests there, or the
core's running + waiting, whichever is larger).

Given up against ``cluster.router.Router``: placement by prefix cache, and failover (a
request whose core dies ends with 503; its API replica attaches again once Serve has
replaced the engine replica). Metrics of the requests (TTFT, ITL, tokens) are recorded
here; the engine's own (KV use, queue) by the engine replicas.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.async_engine import freeze_heap
from cluster.engine_process import START_TIMEOUT_S, EngineLink, attach
from cluster.front import OpenAIFront, ingress_app, stamp_arrival
from cluster.metrics import EngineMetrics, RequestTimer
from cluster.relay import engine_info, prompt_of, relay
from cluster.replica import serve_replica_id
from cluster.streams import EngineGone, PoolFull
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 1.0  # the ledger is read this often for cores to attach to
ATTACH_TIMEOUT_S = 30.0


class ApiIngress(OpenAIFront):
    def __init__(self, engine: DeploymentHandle, model_name: str, max_live_requests: int,
                 stream_interval_s: float = 0.0) -> None:  # fmt: skip
        """``engine``: the engine pool (its replicas started with ``api_links``);
        ``max_live_requests``: a core with this many requests running and waiting (or
        sent by this process) refuses more (HTTP 429); ``stream_interval_s``: least gap
        between a stream's messages after its first token (0: every step)."""
        self.pool = engine
        self.stream_interval_s = stream_interval_s
        self.model_name = model_name
        self.created = int(time.time())
        self.affinity = "off: API processes attached to the engine cores (least load)"
        self.max_live_requests = max_live_requests
        self.replica_id = serve_replica_id()
        self.metrics = EngineMetrics(model_name, self.replica_id)
        self._links: dict[str, EngineLink] = {}  # engine instance → its core
        self._live: dict[str, int] = {}  # requests of this process per instance
        self._stop = threading.Event()
        self._attached = threading.Event()  # the first link is up
        threading.Thread(target=self._watch, name="kvserve-api-attach", daemon=True).start()
        # Ready (to Serve, and so to HAProxy) once a core serves through this process,
        # as an engine replica is once its engine is loaded.
        if not self._attached.wait(START_TIMEOUT_S):
            self._stop.set()
            raise RuntimeError(f"no engine core of {model_name} to attach to in "
                               f"{START_TIMEOUT_S:.0f} s")  # fmt: skip
        freeze_heap()  # the libraries and the tokenizer: out of the collector's full passes

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # --- the cores -------------------------------------------------------------------------
    def _watch(self) -> None:
        """Attaches to every live core of this model the ledger lists, drops links whose
        core is gone; every ``WATCH_PERIOD_S`` (faster until the first link)."""
        import ray

        from cluster.ledger import get_ledger, up

        ledger = None
        while not self._stop.is_set():
            try:
                ledger = ledger or get_ledger()
                rows = ray.get(ledger.instances.remote(), timeout=10)
                self._reconcile(rows, up(rows, self.model_name, ("both",)))
            except Exception as e:
                logger.warning("api: reading the ledger failed: %s", e)
                ledger = None
            try:
                self.metrics.flush_tokens()
            except Exception as e:  # metrics are advisory
                logger.warning("api: metrics failed: %s", e)
            self._stop.wait(WATCH_PERIOD_S if self._links else 0.2)

    def _reconcile(self, rows: list[dict[str, Any]], live: list[dict[str, Any]]) -> None:
        """Drops the links whose core is dead, or whose instance the ledger no longer
        lists (``rows``: silent for its ``stale_s``, so its node may be gone without a
        word on the link) or lists as dead; then attaches to the cores of the instances
        up (``live``) not linked yet."""
        listed = {str(r["instance_id"]) for r in rows if not r.get("dead")}
        for iid, link in list(self._links.items()):
            if link.is_dead or iid not in listed:
                del self._links[iid]
                self._live.pop(iid, None)
                link.shutdown()
        for row in live:
            iid = str(row["instance_id"])
            if row.get("core") is None or iid in self._links:
                continue
            try:
                got = self.pool.core_link.remote(target=iid).result(timeout_s=ATTACH_TIMEOUT_S)
                link = attach(tuple(got["address"]), bytes.fromhex(got["authkey"]),
                              ATTACH_TIMEOUT_S)  # fmt: skip
            except Exception as e:  # it went away meanwhile, or is not up yet
                logger.warning("api: attaching to engine core %s failed: %s", iid, e)
                continue
            self._links[iid] = link
            self._attached.set()
            logger.info("api %s attached to the engine core of %s", self.replica_id, iid)

    def _load(self, iid: str, link: EngineLink) -> int:
        s = link.stats()
        return max(self._live.get(iid, 0), int(s.get("running", 0)) + int(s.get("waiting", 0)))

    def _pick(self) -> tuple[str, EngineLink]:
        live = [(iid, link) for iid, link in list(self._links.items()) if not link.is_dead]
        if not live:
            raise EngineGone("no engine core is attached to this API process (yet)")
        load, iid, link = min((self._load(iid, link), iid, link) for iid, link in live)
        if load >= self.max_live_requests:
            raise PoolFull(f"engine instance {iid} has {self.max_live_requests} requests; "
                           "retry shortly")  # fmt: skip
        return iid, link

    # --- OpenAIFront's hooks ---------------------------------------------------------------
    async def _open(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        iid, link = self._pick()
        arrival = stamp_arrival(req)
        self._live[iid] = self._live.get(iid, 0) + 1
        try:
            params: SamplingParams = req["params"]
            try:
                stream = link.generate(prompt_of(req, link.engine), params, req.get("request_id"))
                first = await anext(stream)
            except ValueError as e:
                yield {"request_id": req.get("request_id"), "error": str(e)}
                return
            kv: dict[str, Any] = {"instance": iid, "api": self.replica_id}
            timer = RequestTimer(self.metrics, arrival)
            async with contextlib.aclosing(relay(stream, first, req, kv, timer, link.engine.tokenizer,
                                                 self.stream_interval_s)) as deltas:  # fmt: skip
                async for delta in deltas:
                    yield delta
        finally:
            if iid in self._live:  # (gone with a dropped link)
                self._live[iid] -= 1

    async def _engine_info(self) -> dict[str, Any]:
        for link in list(self._links.values()):
            return engine_info(self.model_name, "both", link.engine)
        return dict(await self.pool.info.remote())

    async def _serving(self) -> tuple[bool, str]:
        n = sum(not link.is_dead for link in list(self._links.values()))
        if n:
            return True, f"{n} engine cores attached to API replica {self.replica_id}"
        return False, f"no engine core attached to API replica {self.replica_id} (yet)"


ApiDeployment: Any = serve.deployment(name="api")(serve.ingress(ingress_app())(ApiIngress))
