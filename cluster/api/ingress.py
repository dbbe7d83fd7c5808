"""The API ingress: the one Serve ingress of kvserve, ``api_replicas`` processes (behind
HAProxy or Serve's proxy) that serve the OpenAI HTTP routes and the gRPC service
(``cluster.api.http``, ``cluster.api.grpc``) and reach the engine cores over TCP links of their own:

    client ─▶ HAProxy ─▶ api replica 1..K ──TCP──▶ engine core (an engine replica:
                          place, failover            colocated, or the decode pool)

No Ray call lies on a request's path: an API replica places each request by prefix
affinity and load (``cluster.api.cores``), streams its deltas, and resumes it on
another core when its core dies (``cluster.api.server``), in every mode and at every
tensor-parallel size. The engine replicas record the requests' metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api import asgi, server
from cluster.api.asgi import stamp_arrival
from cluster.api.cores import Cores
from cluster.api.grpc import GrpcMethods
from cluster.api.http import OpenAIFront, ingress_app
from cluster.config import ServeConfig
from cluster.core.messages import Delta, Request
from cluster.process import freeze_heap, serve_replica_id

START_TIMEOUT_S = 600.0  # an API replica is ready once a core is attached, at most this


class ApiIngress(OpenAIFront, GrpcMethods):
    async def __init__(self, engine: DeploymentHandle, cfg: ServeConfig) -> None:  # type: ignore[misc]
        """``engine``: the pool the API calls (colocated, or decode); ``cfg`` the app's
        config (the served name, the roles of the pool's instances, the failover limits,
        the API key and body limit). Ready (to Serve, and so to the proxy) once a core
        is attached."""
        model_name = self.model_name = cfg.served_name
        self.replica_id = serve_replica_id()
        self.created = int(time.time())
        self.max_failovers = cfg.max_failovers
        self.failover_timeout_s = cfg.failover_timeout_s
        self.place_timeout_s = cfg.place_timeout_s
        asgi.configure(asgi.GuardSettings(cfg.api_key, cfg.max_body_bytes))
        self.cores = Cores(engine, model_name, cfg.api_roles)
        self.cores.start()
        try:
            await asyncio.wait_for(self.cores.attached.wait(), START_TIMEOUT_S)
        except TimeoutError:
            self.cores.close()
            raise RuntimeError(f"no engine core of {model_name} to attach to in "
                               f"{START_TIMEOUT_S:.0f} s") from None  # fmt: skip
        freeze_heap()  # the libraries: out of the collector's full passes

    @property
    def affinity(self) -> str:  # type: ignore[override]
        return self.cores.affinity

    def _open(self, req: Request) -> AsyncIterator[Delta]:
        stamp_arrival(req)
        return server.stream(self.cores, req, self.cores.prefix(req), self.max_failovers,
                             self.failover_timeout_s, self.place_timeout_s, self.replica_id)  # fmt: skip

    async def _engine_info(self) -> dict[str, Any]:
        for link in self.cores.alive():
            return dict(link.info)
        raise server.EngineGone("no engine core is attached to this API process")

    async def _reset_prefix_cache(self) -> dict[str, int | str]:
        """Over this process's link to every core (each API process reaches them all)."""
        links = self.cores.alive()
        got = await asyncio.gather(*(link.reset_prefix_cache() for link in links),
                                   return_exceptions=True)  # fmt: skip
        done: dict[str, int | str] = {}
        for link, g in zip(links, got, strict=True):
            if isinstance(g, BaseException):
                done[link.instance_id] = f"{type(g).__name__}: {g}"
                continue
            for instance, n in g.items():  # a prefill instance every decode core reset
                prev = done.get(instance)
                done[instance] = max(n, prev) if isinstance(prev, int) else n
        return done

    async def _serving(self) -> tuple[bool, str]:
        n = len(self.cores.alive())
        if n:
            return True, f"{n} engine cores attached"
        return False, "no engine core attached (yet)"


ApiDeployment: Any = serve.deployment(name="api")(serve.ingress(ingress_app())(ApiIngress))
