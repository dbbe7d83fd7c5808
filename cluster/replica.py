"""A pool replica: one engine instance (over one worker group) as a Serve deployment.

The router sends a plain-dict request with ``submit`` and reads plain-dict deltas, one
per engine step that advanced the request, from its one ``subscribe`` stream to this
replica (``cluster.streams``: a list of every request's deltas per item); ``generate``
is the same per request as a stream of its own (tests, tools):

    {"request_id", "prompt_tokens", "cached_tokens", "finished",
     "choices": [{"index", "text", "token_ids", "logprobs", "finish_reason"}]}

``text`` / ``token_ids`` / ``logprobs`` hold only what is new since the previous item.
Bad input yields one ``{"error": message}`` item and ends. Cancelling the stream (the
client went away) aborts the request in the engine, so its blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ray import serve

from cluster import affinity, front_trace, netbind
from cluster.async_engine import AsyncEngine, freeze_heap
from cluster.engine_process import EngineProcess
from cluster.front import OpenAIFront, ingress_app, stamp_arrival
from cluster.kv_links import KVLinks
from cluster.ledger import get_ledger, up
from cluster.metrics import EngineMetrics, RequestTimer
from cluster.pair_health import PairHealth
from cluster.relay import engine_info, prompt_of, relay
from cluster.streams import IDLE_CLOSE_S, SUBSCRIBE_GRACE_S, EngineGone, Outbox, PoolFull, pump
from engine.llm_engine import EngineArgs
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


REPORT_PERIOD_S = 1.0
LAG_PROBE_S = 0.005  # the event loop's lag is sampled this often
# Fault injection (tests): a prefill replica waits this long between announcing a
# transfer and sending it, so that a test can kill it mid-transfer.
FAULT_SEND_DELAY_S = float(os.environ.get("KVSERVE_FAULT_SEND_DELAY_S", "0"))
# Fault injection (tests): a prefill replica fails its first N prefills after offering
# the link (the decode side sees the pair fail and, repeatedly, quarantines it).
FAULT_FAIL_PREFILLS = int(os.environ.get("KVSERVE_FAULT_FAIL_PREFILLS", "0"))
# Pair quarantine (cluster.pair_health): failures in a row, first quarantine seconds.
PAIR_MAX_FAILURES = int(os.environ.get("KVSERVE_PAIR_MAX_FAILURES", "3"))
PAIR_QUARANTINE_S = float(os.environ.get("KVSERVE_PAIR_QUARANTINE_S", "10"))
# Prefill calls per disaggregated request: a failed one is re-placed on another live
# prefill replica until this many were tried; then the decode replica recomputes.
PREFILL_ATTEMPTS = int(os.environ.get("KVSERVE_PREFILL_ATTEMPTS", "2"))
# Conditional disaggregation: a decode replica whose prefix cache leaves at most this many
# prompt tokens uncomputed runs the request itself (no prefill call, no transfer).
LOCAL_PREFILL_TOKENS = int(os.environ.get("KVSERVE_LOCAL_PREFILL_TOKENS", "0"))


class PairQuarantined(RuntimeError):
    """The prefill replica that took the request is quarantined for this decode replica."""


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


def _core_host() -> str:
    """Where an engine core takes API processes: the host local mode binds its servers
    to (``cluster.netbind``, 127.0.0.1 by default), else this node's address."""
    return os.environ.get(netbind.HOST_ENV) or _node_ip()


def serve_replica_id() -> str:
    """This Serve replica's unique id (a made-up one outside Serve)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (a test building the class directly)
        return f"local-{uuid.uuid4().hex[:8]}"


class EngineReplica:
    def __init__(self, engine_args: dict[str, Any], model_name: str, role: str = "both",
                 stream_interval_s: float = 0.0, prefill: Any = None,
                 max_live_requests: int = 1 << 30, engine_process: bool = False,
                 api_links: bool = False) -> None:  # fmt: skip
        """``role``: "both" (colocated), "prefill" or "decode" (disaggregated pools; a
        decode replica gets the prefill pool's handle as ``prefill``).
        ``max_live_requests``: ``submit`` refuses requests beyond this many live ones.
        ``engine_process``: the engine's step loop runs in a child process
        (``cluster.engine_process``; colocated, TP = 1), not on a thread of this one.
        ``api_links``: that process also takes API processes (``cluster.api``) on this
        host: its address goes into the ledger reports, its key to ``core_link``."""
        if role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {role!r}")
        if api_links and not engine_process:
            raise ValueError("api_links: the engine process takes the API processes")
        if engine_process and role != "both":
            raise ValueError("engine_process: the colocated pool only (the KV transfer "
                             "needs the engine in the replica's process)")  # fmt: skip
        if role == "decode" and prefill is None:
            raise ValueError("a decode replica needs the prefill pool's handle")
        self.model_name = model_name
        self.prefill_pool = prefill
        # Least time between two messages of one stream after the first token: fewer,
        # larger messages through Serve when many streams run (0: one per step).
        self.stream_interval_s = stream_interval_s
        self.role = role
        self.max_live_requests = max_live_requests
        self._outboxes: dict[str, Outbox] = {}
        self.stream_items = 0  # items sent on routers' streams ...
        self.stream_deltas = 0  # ... carrying this many request deltas
        self.submitted = 0
        self.replica_id = serve_replica_id()
        args = EngineArgs(**engine_args)
        self.engine: AsyncEngine | EngineProcess = (
            EngineProcess(args, listen=_core_host() if api_links else None)
            if engine_process
            else AsyncEngine(args)
        )
        self.tokenizer = self.engine.engine.tokenizer
        self.max_model_len = self.engine.engine.scheduler_config.max_model_len
        self.metrics = EngineMetrics(model_name, self.replica_id)
        self.links: KVLinks | None = None
        self.pairs = PairHealth(PAIR_MAX_FAILURES, PAIR_QUARANTINE_S, max(PAIR_QUARANTINE_S, 300.0))
        self._faults_left = FAULT_FAIL_PREFILLS
        if role != "both":
            backend = "nccl" if self._local.engine.runner.device.type == "cuda" else "gloo"
            executor = self._local.engine.executor
            ranks = executor.rank_actors() if hasattr(executor, "rank_actors") else []
            self.links = KVLinks(self.replica_id, _node_ip(), backend, ranks=ranks)
        self._stop = threading.Event()
        self._lags: list[float] = []  # the event loop's lag (s) since the last report
        front_trace.stamp_http_reads()
        loop = _running_loop()
        if loop is not None:
            self._lag_probe = loop.create_task(self._probe_loop_lag())
        self._reporter = threading.Thread(target=self._report_loop, name="kvserve-report",
                                          daemon=True)  # fmt: skip
        self._reporter.start()
        freeze_heap()  # the libraries, the tokenizer and an engine in this process

    @property
    def _local(self) -> AsyncEngine:
        """The engine in this process (the prefill and decode roles always have one)."""
        assert isinstance(self.engine, AsyncEngine), "the colocated role runs no KV transfer"
        return self.engine

    async def _probe_loop_lag(self) -> None:
        """How late this replica's event loop runs what is due: the wait that every
        request's arrival, each streamed chunk and the engine's outputs meet here
        (``loop_lag_*_ms`` in the reports, and a gauge)."""
        sampler = front_trace.StallSampler(threading.get_ident()) if front_trace.TRACE_DIR else None
        while True:
            t = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            self._lags.append(time.monotonic() - t - LAG_PROBE_S)
            if sampler is not None:
                sampler.beat()

    def _lag_stats(self) -> dict[str, float]:
        lags, self._lags = self._lags, []
        if not lags:
            return {}
        lags.sort()
        return {"loop_lag_p50_ms": round(lags[len(lags) // 2] * 1e3, 3),
                "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1e3, 3),
                "loop_lag_max_ms": round(lags[-1] * 1e3, 3)}  # fmt: skip

    def _report_loop(self) -> None:
        """Every second: metrics gauges/counters and a ledger report."""
        import ray

        ledger = None
        last: Any = None  # the previous report: a failed one means a new ledger handle
        while True:  # the first report at once: health (cluster.router) reads the ledger
            stats = {**self.engine.stats(), **self._stream_stats(), **self._lag_stats(),
                     "dead": not self._healthy()}  # fmt: skip
            core = getattr(self.engine, "address", None)
            if core is not None:  # API processes attach there (cluster.api)
                stats["core"] = list(core)
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
        core (``cluster.engine_process.attach``); ``target`` as for ``stats``.
        ``ValueError`` when the core takes no API processes (``api_links`` off)."""
        self._check_target(target)
        address = getattr(self.engine, "address", None)
        if not isinstance(self.engine, EngineProcess) or address is None:
            raise ValueError(f"engine instance {self.replica_id} takes no API processes")
        return {"address": list(address), "authkey": self.engine.authkey.hex()}

    def _check_target(self, target: str) -> None:
        """A call pinned to ``target`` (``cluster.request_router``) that reached another
        replica: that instance is gone."""
        if target and target != self.replica_id:
            raise RuntimeError(f"engine instance {target} is gone (this is {self.replica_id})")

    def _stream_stats(self) -> dict[str, int]:
        return {"submitted": self.submitted, "stream_items": self.stream_items,
                "stream_deltas": self.stream_deltas}  # fmt: skip

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``cluster.autoscale.kv_aware_policy`` scales on (Serve collects it)."""
        return self._load()

    def record_routing_stats(self) -> dict[str, Any]:
        """What ``cluster.request_router`` places new requests by (Serve collects it):
        the load, and the prefix-cache blocks held (``cluster.affinity``)."""
        held = self.engine.engine.prefix_hashes(affinity.REPORT_MAX)
        return {**self._load(), "prefix": [affinity.short(h) for h in held]}

    def _load(self) -> dict[str, float]:
        s = self.engine.stats()
        return {k: float(s[k]) for k in ("kv_usage", "waiting", "running", "free_blocks")}

    async def check_health(self) -> None:
        """Serve's health check: a dead engine (or worker group) fails it."""
        self.engine.check_health()

    # --- the router's streams (cluster.streams) --------------------------------------------
    def _live(self) -> int:
        return sum(len(box.tasks) for box in self._outboxes.values())

    def _full(self) -> str | None:
        """Why a new request is refused (``max_live_requests`` live), or None."""
        if self._live() < self.max_live_requests:
            return None
        return f"engine instance {self.replica_id} has {self.max_live_requests} requests; retry shortly"

    async def submit(self, req: dict[str, Any], router: str, avoid: list[str] | None = None,
                     prefix: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
        """Starts ``req`` (its ``request_id`` set by the router); its deltas go to
        ``router``'s stream. ``{"instance": id}``, or ``{"full": message}`` when this
        replica already has ``max_live_requests`` live. A dead engine raises.
        ``avoid``: replicas the request router should not pick (a failover's dead ones);
        ``prefix``: the prompt's leading block hashes, for the request router's prefix
        affinity (``cluster.affinity``)."""
        self.engine.check_health()
        full = self._full()
        if full is not None:
            return {"full": full}
        box = self._outboxes.get(router)
        if box is None:
            box = self._outboxes[router] = Outbox()
            asyncio.get_running_loop().call_later(SUBSCRIBE_GRACE_S, self._reap, router, box)
        rid = str(req["request_id"])
        req["submitted_at"] = time.monotonic()  # this process's clock (timing_ms)
        box.tasks[rid] = asyncio.ensure_future(pump(rid, self.generate(req), box))
        self.submitted += 1
        return {"instance": self.replica_id}

    def _reap(self, router: str, box: Outbox) -> None:
        if not box.subscribed and self._outboxes.get(router) is box:
            logger.warning("router %s never subscribed; dropping its %d requests", router,
                           len(box.tasks))  # fmt: skip
            del self._outboxes[router]
            box.cancel_all()

    async def subscribe(self, router: str, target: str = "") -> AsyncIterator[list[dict[str, Any]]]:
        """``router``'s deltas, a list per item, until the router goes away (then its
        requests are aborted) or it has been idle ``IDLE_CLOSE_S`` with no request
        left. ``target``: the replica the router meant; another replica refuses (the
        router's instance is gone)."""
        self._check_target(target)
        box = self._outboxes.setdefault(router, Outbox())
        box.subscribed = True
        try:
            while True:
                try:
                    items = await box.take(IDLE_CLOSE_S)
                except TimeoutError:
                    if not box.tasks and not box.items:
                        return  # idle: the router reopens when it needs to
                    continue
                self.stream_items += 1
                self.stream_deltas += len(items)
                yield items
        finally:
            if self._outboxes.get(router) is box:
                del self._outboxes[router]
            box.cancel_all()

    async def cancel(self, request_id: str, router: str, target: str = "") -> None:
        """Aborts ``router``'s request ``request_id`` (its blocks return to the pool)."""
        box = self._outboxes.get(router)
        task = None if box is None else box.tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def generate(self, req: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        params: SamplingParams = req["params"]
        arrival = time.monotonic()
        try:
            prompt = prompt_of(req, self.engine.engine)
            kv: dict[str, Any] = {"instance": self.replica_id}
            rid = req.get("request_id") or self.engine.new_request_id()
            resume = [int(t) for t in req.get("resume") or ()]
            if resume:  # a failover after tokens were sent (cluster.streams)
                kv.update({"mode": "resumed", "resumed_tokens": len(resume)})
                stream = self.engine.generate(prompt, params, rid, resume)
            elif self.role == "decode":
                stream = self._disaggregated(prompt, params, rid, kv)
            else:
                stream = self.engine.generate(prompt, params, rid)
            first = await anext(stream)
        except ValueError as e:
            yield {"request_id": req.get("request_id"), "error": str(e)}
            return
        # A resumed request's outputs carry what the client has already (its tokens, and
        # text up to ``resume_text``): send only what follows.
        sent = {0: (int(req.get("resume_text", 0)), len(resume))} if resume else {}
        timer = RequestTimer(self.metrics, arrival)
        async with contextlib.aclosing(relay(stream, first, req, kv, timer, self.tokenizer,
                                             self.stream_interval_s, sent)) as deltas:  # fmt: skip
            async for delta in deltas:
                yield delta

    # --- disaggregated pools --------------------------------------------------------------
    async def prefill(self, req: dict[str, Any], avoid: list[str] | None = None,
                      prefix: list[int] | None = None) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Prefill side of a disaggregated request (called by a decode replica).

        ``req``: ``prompt`` (token ids), ``params``, ``request_id``, ``decode`` (the
        decode replica's id), ``num_blocks`` (what it reserved) and ``skip_blocks`` (the
        prompt's leading blocks it has cached: not sent). Yields, in order:
        ``{"link": offer}`` (join it if new), ``{"seq", "first_token", "cached_tokens",
        "num_blocks"}`` right before the blocks are sent on that link's turn ``seq``,
        or ``{"error": message}``. ``req["stale_links"]``: (peer, gen) links the decode
        side closed (renewed here); ``avoid`` and ``prefix`` (the prompt's leading block
        hashes: prefix affinity) are for the request router. The blocks are
        released (kept as prefix cache) once the send is over, whether or not the caller
        still listens."""
        assert self.links is not None, "not a prefill replica"
        rid = f"{req['request_id']}-prefill"
        peer = str(req["decode"])
        stale = [int(g) for p, g in req.get("stale_links", ()) if p == self.replica_id]
        yield {"link": self.links.offer(peer, stale)}
        if self._faults_left > 0:  # fault injection (tests)
            self._faults_left -= 1
            yield {"error": "injected prefill failure (KVSERVE_FAULT_FAIL_PREFILLS)"}
            return
        try:
            out = await self._local.prefill(req["prompt"], req["params"], rid)
        except Exception as e:  # bad input or a dead engine: the decode side recomputes
            yield {"error": f"prefill failed: {e}"}
            return
        held = out.kv_block_ids or []
        blocks = held[int(req.get("skip_blocks", 0)) :]
        if len(blocks) != int(req["num_blocks"]):
            self._local.release_kv_nowait(rid)
            yield {"error": f"prefill holds {len(held)} blocks, the decode side has "
                            f"{req.get('skip_blocks', 0)} and reserved {req['num_blocks']}"}  # fmt: skip
            return
        header: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def announce(seq: int) -> None:
            await header.put({"seq": seq, "first_token": out.outputs[0].token_ids[0],
                              "cached_tokens": out.num_cached_tokens,
                              "num_blocks": len(blocks)})  # fmt: skip
            if FAULT_SEND_DELAY_S:  # fault injection: the receiver waits in its receive
                await asyncio.sleep(FAULT_SEND_DELAY_S)

        send = asyncio.ensure_future(
            self.links.send(peer, self._local.kv_caches(), blocks, announce)
        )
        send.add_done_callback(lambda _: self._local.release_kv_nowait(rid))
        got = asyncio.ensure_future(header.get())
        try:
            await asyncio.wait([send, got], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the decode side left (e.g. a quarantined pair)
            if not got.done():
                send.cancel()  # not announced: no turn of the link taken; blocks released
            raise
        if got.done():
            yield got.result()
        else:
            got.cancel()
            yield {"error": f"transfer failed before it started: {send.exception()!r}"}
            return
        with contextlib.suppress(Exception):  # failures were logged; the link is broken
            await asyncio.shield(send)

    async def _disaggregated(self, prompt: str | list[int], params: SamplingParams, rid: str,
                             kv: dict[str, Any]) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Decode side: reserve blocks, have a prefill replica compute the prompt and send
        its K/V into them, then decode here.

        A prefill or transfer that fails (the prefill replica died, its engine failed, the
        link broke) is re-placed on another live prefill replica, keeping the reserved
        blocks, up to ``PREFILL_ATTEMPTS`` in all (``kv["prefill_retries"]``,
        ``kv["prefill_failures"]``). When none is left, the reservation is released and
        the prompt is recomputed here (the client sees a normal response; ``kv["mode"]``
        says "recomputed"). No room, or n > 1: the request runs here from the start
        ("local").

        Only what this replica lacks moves: the prompt's leading full blocks that are
        in its prefix cache (a previous turn of the conversation, say) are not sent
        (they count in the response's ``cached_tokens``). When at most
        ``LOCAL_PREFILL_TOKENS`` of the prompt are left, it runs here ("local", no
        prefill call)."""
        ids = self.engine.engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        blocks = await self._local.reserve(ids, params, rid) if params.n == 1 else None
        skip = 0  # the prompt's leading blocks held here: not sent
        if blocks is not None:
            bs = self.engine.engine.args.block_size
            skip = -(-len(ids) // bs) - len(blocks)
            if len(ids) - skip * bs <= LOCAL_PREFILL_TOKENS:
                self.engine.abort(rid)  # the reservation; the hits stay cached
                blocks, kv["reason"] = None, f"{len(ids) - skip * bs} tokens left to compute"
        if blocks is None:
            kv["mode"] = "local"
            async for out in self.engine.generate(ids, params, rid):
                yield out
            return
        ledger_res = await self._ledger_reserve(rid, len(blocks))
        failed: list[str] = []
        while True:
            fetch = asyncio.ensure_future(
                self._fetch_kv(ids, params, rid, blocks, skip, kv, failed)
            )
            try:
                first = await asyncio.shield(fetch)
                break
            except asyncio.CancelledError:  # the client left: the transfer still completes
                fetch.add_done_callback(lambda _: self.engine.abort(rid))
                self._ledger_settle(ledger_res, False)
                raise
            except Exception as e:
                peer = kv.pop("prefill_instance", None)
                if isinstance(e, PairQuarantined):  # not a new failure: the pair is resting
                    kv.update({"mode": "local", "reason": str(e)[:300]})
                else:
                    self._prefill_failed(rid, peer, e, kv)
                    if peer is not None and len(failed) + 1 < PREFILL_ATTEMPTS:
                        failed.append(peer)
                        if await self._prefill_left(failed):
                            kv["prefill_retries"] = len(failed)
                            logger.warning("request %s: prefill on %s failed (%s); re-placing "
                                           "it on another prefill replica", rid, peer, e)  # fmt: skip
                            continue
                    kv.update({"mode": "recomputed", "error": str(e)[:300]})
                self._ledger_settle(ledger_res, False)
                self.engine.abort(rid)
                async for out in self.engine.generate(ids, params, rid):
                    yield out
                return
        self._ledger_settle(ledger_res, True)
        self.pairs.success(kv["prefill_instance"])
        kv["mode"] = "transferred"
        self.metrics.kv_transfer_bytes.inc(max(1, kv["transferred_bytes"]))
        self.metrics.kv_transfer_seconds.observe(kv["transfer_seconds"])
        async for out in self._local.transferred(rid, first):
            yield out

    def _prefill_failed(self, rid: str, peer: str | None, e: Exception,
                        kv: dict[str, Any]) -> None:  # fmt: skip
        """Counts a failed prefill or transfer against its pair (quarantining a pair that
        keeps failing, which closes its links) and notes it in ``kv``."""
        logger.warning("request %s: prefill/transfer on %s failed: %s", rid, peer, e)
        self.metrics.kv_transfer_failures.inc()
        kv.setdefault("prefill_failures", []).append(peer)
        if peer is not None and self.pairs.failure(peer, time.monotonic()):
            logger.warning("quarantining the pair with prefill replica %s: %s", peer,
                           self.pairs.snapshot(time.monotonic()).get(peer))  # fmt: skip
            assert self.links is not None
            self.links.break_peer(peer, RuntimeError("pair quarantined"))

    async def _prefill_left(self, exclude: list[str]) -> bool:
        """Whether the ledger knows a live prefill replica of this model outside
        ``exclude`` and outside the quarantined pairs (no: recompute here rather than
        wait for Serve to start one)."""
        exclude = [*exclude, *self.pairs.quarantined(time.monotonic())]
        try:
            rows = await asyncio.wait_for(get_ledger().instances.remote(), 2.0)
        except Exception as e:
            logger.warning("the ledger did not answer (%s): no prefill re-placement", e)
            return False
        return bool(up(rows, self.model_name, ("prefill",), exclude))

    async def _fetch_kv(self, ids: list[int], params: SamplingParams, rid: str,
                        blocks: list[int], skip: int, kv: dict[str, Any],
                        avoid: list[str]) -> int:  # fmt: skip
        """Runs one prefill call, away from ``avoid`` and the quarantined pairs while
        other prefill replicas exist, and receives its K/V into ``blocks`` (the prompt's
        blocks after the first ``skip``, which are cached here); the first token."""
        assert self.links is not None and self.prefill_pool is not None
        req = {"prompt": ids, "params": params, "request_id": rid, "decode": self.replica_id,
               "num_blocks": len(blocks), "skip_blocks": skip,
               "stale_links": self.links.stale_links()}  # fmt: skip
        now = time.monotonic()
        eng = self.engine.engine
        gen = self.prefill_pool.options(stream=True).prefill.remote(
            req,
            avoid=sorted({*self.pairs.quarantined(now), *avoid}),
            prefix=affinity.prompt_prefix(ids, eng.args.block_size, eng.prefix_key),
        )
        key: tuple[str, int] | None = None
        try:
            async for item in gen:
                if "error" in item:
                    raise RuntimeError(item["error"])
                if "link" in item:
                    peer = str(item["link"]["peer"])
                    kv["prefill_instance"] = peer
                    if self.pairs.is_quarantined(peer, now):
                        gen.cancel()  # the prefill side aborts; nothing was computed here
                        raise PairQuarantined(f"the pair with prefill replica {peer} is "
                                              "quarantined after repeated failures")  # fmt: skip
                    key = self.links.accept(item["link"])
                elif "seq" in item:
                    assert key is not None, "the prefill side sent no link"
                    nbytes, secs = await self.links.recv(key, int(item["seq"]),
                                                         self._local.kv_caches(), blocks)  # fmt: skip
                    kv.update({"transferred_bytes": nbytes, "transfer_seconds": secs,
                               "prefill_cached_tokens": int(item["cached_tokens"])})  # fmt: skip
                    return int(item["first_token"])
        except Exception as e:
            if key is not None and not isinstance(e, RuntimeError):  # incl. PairQuarantined
                self.links.break_link(key, e)  # the prefill replica is gone: so is the link
            raise
        raise RuntimeError("the prefill stream ended without a transfer")

    async def _ledger_reserve(self, rid: str, n: int) -> tuple[str, int] | None:
        try:
            res: tuple[str, int] | None = await get_ledger().reserve.remote(self.replica_id, rid, n)
            return res
        except Exception as e:  # advisory: the blocks are held here either way
            logger.warning("ledger reservation failed: %s", e)
            return None

    def _ledger_settle(self, res: tuple[str, int] | None, used: bool) -> None:
        if res is not None:
            with contextlib.suppress(Exception):
                get_ledger().settle.remote(res[0], res[1], used)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this runs on (Serve constructs a replica on its user-code loop,
    where its requests run too), or None (the lag probe runs there)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


EngineDeployment: Any = serve.deployment(name="engine")(EngineReplica)


class EngineIngress(OpenAIFront, EngineReplica):
    """An engine replica that is the Serve ingress itself (``ServeConfig.ingress =
    "engine"``): the routes and RPCs of ``cluster.front`` run in this process, on the
    engine's own stream of each request, so no Ray call lies between the client's
    connection and the engine. Behind HAProxy (Serve's direct ingress) the client's
    connection reaches this replica's own HTTP/gRPC server; behind Serve's Python proxy
    the proxy calls it (one Ray streaming call per request).

    What the ``cluster.router.Router`` deployment adds is given up: the front (HAProxy:
    least connections; Serve's proxy: its own choice) picks the replica, not by prefix
    cache or KV use, and a request whose replica dies fails (503) rather than moving to
    another. With one replica per model, or replicas that share no prefixes, nothing is
    lost. The same class serves a disaggregated decode pool (``role="decode"``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        EngineReplica.__init__(self, *args, **kwargs)
        self.created = int(time.time())
        self.affinity = "off: the engine replicas are the ingress (the front picks one)"
        self._direct = 0  # requests of this replica's own front, live

    def _live(self) -> int:
        return super()._live() + self._direct

    async def _open(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        try:
            self.engine.check_health()
        except Exception as e:
            raise EngineGone(f"engine instance {self.replica_id} failed: {e}") from None
        full = self._full()
        if full is not None:
            raise PoolFull(full)
        stamp_arrival(req)
        self._direct += 1
        self.submitted += 1
        try:
            async with contextlib.aclosing(self.generate(req)) as gen:
                async for item in gen:
                    yield item
        finally:
            self._direct -= 1

    async def _engine_info(self) -> dict[str, Any]:
        return await self.info()

    async def _serving(self) -> tuple[bool, str]:
        if self._healthy():
            return True, f"engine instance {self.replica_id} up"
        return False, f"engine instance {self.replica_id} failed (engine or worker group)"


EngineIngressDeployment: Any = serve.deployment(name="engine")(
    serve.ingress(ingress_app())(EngineIngress)
)
