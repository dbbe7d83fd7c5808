"""The router: a Serve ingress of its own in front of the engine pool.

It holds no model state. Each request goes to an ``EngineReplica`` chosen by
``cluster.request_router`` (load, KV use, and the prefix blocks it caches: the router
tokenizes and hashes the prompt, ``cluster.affinity``); its tokens come back over one
stream per replica (``cluster.streams.StreamMux``), which moves a request to another
replica when its own dies. A client that disconnects cancels its request on the
replica, which aborts it in the engine. The routes and RPCs are ``cluster.front``'s.

``ServeConfig.ingress = "engine"`` leaves this deployment out: the engine replicas are
the ingress (``cluster.replica.EngineIngress``).
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.affinity import PromptHasher
from cluster.async_engine import freeze_heap
from cluster.front import OpenAIFront, ingress_app
from cluster.streams import StreamMux

logger = logging.getLogger(__name__)

HEALTH_CALL_TIMEOUT_S = 3.0


class Router(OpenAIFront):
    def __init__(self, engine: DeploymentHandle, model_name: str) -> None:
        self.pool = engine
        self.mux = StreamMux(engine)
        self.model_name = model_name
        self.created = int(time.time())
        self._hasher: PromptHasher | None = None  # prefix affinity (cluster.affinity)
        self.affinity = "loading"  # then "on", or "off: why"
        threading.Thread(target=self._load_hasher, name="kvserve-affinity", daemon=True).start()

    def _prefix(self, req: dict[str, Any]) -> list[int] | None:
        """The prompt's leading block hashes for the request router's prefix affinity;
        None until the engine's tokenizer is loaded here (``affinity`` says "on"), or
        when the prompt does not tokenize (the engine says why). The token ids go along
        in ``req["prompt_ids"]``: the replica does not tokenize the prompt again."""
        hasher = self._hasher
        if hasher is None:
            return None
        try:
            ids = hasher.token_ids(req)
        except Exception:
            return None
        req["prompt_ids"] = ids
        return hasher.prefix(ids)

    def _load_hasher(self) -> None:
        """From the router's start, on a thread of its own (importing transformers and
        loading the tokenizer take seconds of CPU, which should not land on the first
        requests): asks the pool for its engine's ``info`` until a replica answers, then
        loads the tokenizer. ``affinity`` says how it went (``/health`` shows it)."""
        delay = 0.5
        while True:
            try:
                info = self.pool.info.remote().result(timeout_s=60)
                break
            except Exception as e:  # no replica up yet
                logger.info("prefix affinity waits for an engine replica: %s", e)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        try:  # a decode pool too: its replicas receive only the blocks they lack
            self._hasher = PromptHasher(info)
            self.affinity = "on"
        except Exception as e:  # e.g. the model directory is on another node
            logger.warning("no prefix affinity in this router: %s", e)
            self.affinity = f"off: {type(e).__name__}: {str(e)[:200]}"
        freeze_heap()  # what the router's start loaded: out of the collector's full passes

    def _open(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.mux.open(req, self._prefix(req))

    async def _engine_info(self) -> dict[str, Any]:
        return dict(await self.pool.info.remote())

    async def _serving(self) -> tuple[bool, str]:
        """The ledger knows every instance's last report (each replica reports once a
        second, with whether its engine and worker group are alive): serving while one
        instance of this model and of the pool the router calls (role "both" or
        "decode") reported itself alive within ``ledger.FRESH_S``. A replica that died
        stops reporting; one whose rank actor died reports ``dead`` within a second. When
        the ledger has no row of this model yet (just deployed) or cannot be reached, one
        health call to the pool decides, bounded by ``HEALTH_CALL_TIMEOUT_S`` (a pool
        with no replica left would queue it forever)."""
        from cluster.ledger import get_ledger, up

        try:
            rows = await asyncio.wait_for(get_ledger().instances.remote(), HEALTH_CALL_TIMEOUT_S)
        except Exception as e:
            logger.warning("health: the ledger did not answer (%s); asking the pool", e)
            rows = []
        mine = [r for r in rows if r.get("model") == self.model_name
                and r.get("role") in ("both", "decode")]  # fmt: skip
        if mine:
            alive = up(mine, self.model_name, ("both", "decode"))
            if alive:
                return True, f"{len(alive)} of {len(mine)} engine instances up"
            return False, f"no engine instance up ({len(mine)} known, none alive and reporting)"
        try:
            await asyncio.wait_for(self.pool.check_health.remote(), HEALTH_CALL_TIMEOUT_S)
        except Exception as e:  # any failure of the pool means not serving
            return False, f"the engine pool did not pass its health check: {str(e)[:200]}"
        return True, "the engine pool passed its health check"


RouterDeployment: Any = serve.deployment(name="router")(serve.ingress(ingress_app())(Router))
