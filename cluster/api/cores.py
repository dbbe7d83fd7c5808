"""An API process's view of the engine cores: a link to each, and where a request goes.

``Cores.start`` runs a task on the API replica's event loop that reads the ledger every
``WATCH_PERIOD_S``: it attaches to each live core of the model that the API calls
(role ``both``, or ``decode`` when disaggregated: the decode core asks the prefill
pool itself) and drops links whose instance is dead or no longer listed. The key of a
core comes from its replica (``EngineReplica.core_link``, a Serve call pinned to it).

``place`` picks the core for a new request with the one placement policy,
``GlobalBlockManager.place`` (this process's view, ``blocks``): the core holding the
most of the prompt's leading blocks while its load is within a slack of the least
loaded one's, else the least loaded, among those with room for the prompt's blocks;
it records a leased reservation, confirmed once the core took the request and
released if it did not. The figures come on the links with every message (each step,
at least every second), so placement makes no Ray call per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from cluster.core.client import CoreLink
from cluster.core.messages import Request
from cluster.placement import affinity
from cluster.placement.block_manager import GlobalBlockManager, LedgerError, Placement
from cluster.placement.ledger import get_ledger, up
from engine.kv_budget import blocks_for as kv_blocks_for
from engine.kv_budget import demand_blocks, projected_tokens

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 1.0  # the ledger is read this often
ATTACH_TIMEOUT_S = 30.0
LEDGER_TIMEOUT_S = 10.0
LEASE_S = 30.0  # a reservation not confirmed or released by then lapses


class Cores:
    def __init__(self, pool: Any, model_name: str, roles: tuple[str, ...]) -> None:
        """``pool``: the handle of the engine pool the API calls (its replicas' cores);
        ``roles``: the roles of that pool's instances."""
        self.pool = pool
        self.model_name = model_name
        self.roles = roles
        self.links: dict[str, CoreLink] = {}
        self.blocks = GlobalBlockManager(lease_s=LEASE_S)  # this process's view of the cores
        self.attached = asyncio.Event()  # set while a link is up
        self.hasher: affinity.PromptHasher | None = None
        self.affinity = "loading"  # then "on", or "off: why" (``/health``)
        self._task: asyncio.Task[None] | None = None
        self._hasher_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for link in self.links.values():
            link.close()

    def alive(self) -> list[CoreLink]:
        return [link for link in self.links.values() if link.dead is None]

    def place(
        self,
        request_id: str,
        num_blocks: int,
        prefix: Sequence[int] = (),
        avoid: Sequence[str] = (),
    ) -> tuple[CoreLink, Placement] | None:
        """The core for a new request of ``num_blocks`` prompt blocks (see the module
        doc) outside ``avoid``, and its placement (``settle`` it); None when no core
        outside ``avoid`` has room."""
        now = time.monotonic()
        for link in self.alive():
            self._report(link, now)
        placed = self.blocks.place(request_id, num_blocks, prefix, now, avoid)
        if placed is None:
            return None
        return self.links[placed.decode_id], placed

    def settle(self, placed: Placement | None, taken: bool) -> None:
        """The core took the request (its blocks count in its next figures), or not."""
        if placed is None:
            return
        res = placed.reservation
        try:
            if taken:
                self.blocks.confirm(res.reservation_id, res.token)
            else:
                self.blocks.release(res.reservation_id, res.token)
        except LedgerError:  # lapsed, or the instance was dropped meanwhile
            pass

    def _report(self, link: CoreLink, now: float) -> None:
        """A link's latest figures into ``blocks``; this process's requests in flight
        there count as waiting when the core's own figures do not show them yet."""
        s = link.stats
        iid = link.instance_id
        capacity = int(s.get("num_blocks", 0))
        known = self.blocks.instances.get(iid)
        if known is None or known.capacity != capacity:
            self.blocks.register(iid, link.role, int(s.get("tp", 1)),
                                 int(s.get("block_size", 16)), capacity, now)  # fmt: skip
        running = int(s.get("running", 0))
        waiting = max(int(s.get("waiting", 0)), link.live - running)
        used = demand_blocks(capacity, int(s.get("free_blocks", capacity)),
                             int(s.get("projected_blocks", 0)))  # fmt: skip
        self.blocks.report(iid, used, running, waiting, link.held, now)

    def blocks_for(self, req: Request) -> int:
        """The KV blocks ``req`` is projected to take (``engine.kv_budget``: its prompt
        and, when ``max_tokens`` bounds it, its whole decode; 1 while its length is
        unknown here)."""
        ids = req.get("prompt_ids")
        if ids is None or self.hasher is None:
            return 1
        params = req.get("params")
        bound = getattr(params, "max_tokens", None)
        tokens = projected_tokens(len(ids), bound, len(ids), self.hasher.max_model_len, 0)
        return max(1, kv_blocks_for(tokens, self.hasher.block_size))

    def prefix(self, req: Request) -> list[int]:
        """The prompt's leading block hashes (none until the tokenizer is loaded, or when
        the prompt does not tokenize: the core says why). Sets ``req["prompt_ids"]``:
        the core does not tokenize again."""
        hasher = self.hasher
        if hasher is None:
            return []
        try:
            ids = hasher.token_ids(req)
        except Exception:
            return []
        req["prompt_ids"] = ids
        return hasher.prefix(ids)

    async def _watch(self) -> None:
        ledger = None
        while True:
            try:
                ledger = ledger or get_ledger()
                rows = await asyncio.wait_for(ledger.instances.remote(), LEDGER_TIMEOUT_S)
                await self._reconcile(rows)
            except Exception as e:
                logger.warning("api: reading the ledger failed: %s", e)
                ledger = None
            await asyncio.sleep(WATCH_PERIOD_S if self.links else 0.2)

    async def _reconcile(self, rows: list[dict[str, Any]]) -> None:
        """Drops the links whose core is dead or whose instance the ledger no longer
        lists (or lists as dead), then attaches to the live cores not linked yet."""
        listed = {str(r["instance_id"]) for r in rows if not r.get("dead")}
        for iid, link in list(self.links.items()):
            if link.dead is not None or iid not in listed:
                del self.links[iid]
                link.close()
                if iid in self.blocks.instances:
                    self.blocks.remove_instance(iid)
        for row in up(rows, self.model_name, self.roles):
            iid = str(row["instance_id"])
            if row.get("core") is None or iid in self.links:
                continue
            try:
                got = await asyncio.wait_for(self.pool.core_link.remote(target=iid),
                                             ATTACH_TIMEOUT_S)  # fmt: skip
                link = await CoreLink.open(iid, got["address"], bytes.fromhex(got["authkey"]))
            except Exception as e:  # gone meanwhile, or not up yet: next round
                logger.warning("api: attaching to engine core %s failed: %s", iid, e)
                continue
            self.links[iid] = link
            logger.info("api: attached to the engine core of %s", iid)
            if self._hasher_task is None:
                self._hasher_task = asyncio.ensure_future(self._load_hasher(link.info))
        if self.alive():
            self.attached.set()
        else:
            self.attached.clear()

    async def _load_hasher(self, info: dict[str, Any]) -> None:
        """The engine's tokenizer, for prefix affinity (loading takes seconds of CPU:
        on a thread, so the first requests are not held)."""
        try:
            self.hasher = await asyncio.to_thread(affinity.PromptHasher, info)
            self.affinity = "on"
        except Exception as e:  # e.g. the model directory is on another node
            logger.warning("no prefix affinity in this API process: %s", e)
            self.affinity = f"off: {type(e).__name__}: {str(e)[:200]}"
