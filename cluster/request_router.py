"""Serve request router of the engine pools: calls aimed at one replica, and load-aware
placement of new requests.

The router talks to an engine replica over one long-lived stream per (router, replica)
pair (see ``cluster.streams``); the calls that belong to that pair (``subscribe``,
``cancel``) name their replica with a ``target`` keyword argument, and this router
sends them there. New requests (``submit``) go to the replica with the least load,
where load is the larger of

- the requests this process has live on the replica (``cluster.streams.LIVE``, exact
  and current for a single router), and
- what the replica last reported through ``record_routing_stats`` (running + waiting
  in its engine: every router's requests, one stats period old).

A call that carries its prompt's leading block hashes (``prefix``) goes first to the
replica whose prefix cache holds the most of them, while that replica's load is within
``cluster.affinity.SLACK`` of the least loaded one's (``cluster.affinity.rank``).

A call may also name replicas to ``avoid`` (a decode replica's quarantined prefill
peers, ``cluster.pair_health``): they get it only when no other replica exists.

A target that is no longer a running replica is sent to any replica: the replica sees
that it is not the target and refuses the call, so the caller learns at once that its
instance is gone (rather than waiting on a route that cannot exist).

Use it with ``request_router_config=RequestRouterConfig(request_router_class=
"cluster.request_router:EngineRequestRouter")``.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from cluster import affinity
from cluster.streams import LIVE

ROUTER_CLASS = "cluster.request_router:EngineRequestRouter"
TARGET = "target"  # the keyword argument that pins a call to one replica
AVOID = "avoid"  # replicas (unique ids) a call should not go to while others exist
PREFIX = "prefix"  # the prompt's leading block hashes (cluster.affinity)


def load_of(replica: RunningReplica, queue_len: int | None = None) -> float:
    """A replica's load as this process sees it (see the module docstring);
    ``queue_len``: Serve's last probe of its ongoing calls, when known (what counts for
    pools whose requests are whole calls, like the prefill pool)."""
    uid = replica.replica_id.unique_id
    stats = replica.routing_stats or {}
    reported = float(stats.get("running", 0)) + float(stats.get("waiting", 0))
    return max(float(LIVE.get(uid, 0)), reported, float(queue_len or 0))


class EngineRequestRouter(LocalityMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        target = None if pending_request is None else pending_request.kwargs.get(TARGET)
        if target:
            for r in candidate_replicas:
                if r.replica_id.unique_id == target:
                    return [[r]]
            return [[random.choice(candidate_replicas)]]  # gone: that replica refuses it
        avoid = set((pending_request.kwargs.get(AVOID) if pending_request else None) or ())
        if avoid:
            kept = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid]
            candidate_replicas = kept or candidate_replicas  # no other: the caller decides
        cache = getattr(self, "_replica_queue_len_cache", None)

        def load(r: RunningReplica) -> float:
            return load_of(r, cache.get(r.replica_id) if cache is not None else None)

        prefix = (pending_request.kwargs.get(PREFIX) if pending_request else None) or ()

        def hits(r: RunningReplica) -> int:
            return affinity.leading_hits(prefix, self._held(r)) if prefix else 0

        ranked = affinity.rank(candidate_replicas, load, hits)
        return [[r] for r in ranked]  # the first if it takes it; the next if it refuses

    def _held(self, replica: RunningReplica) -> frozenset[int]:
        """The prefix blocks ``replica`` last reported (a set, rebuilt per report)."""
        reported = (replica.routing_stats or {}).get("prefix") or ()
        memo: dict[str, tuple[Any, frozenset[int]]] = self.__dict__.setdefault("_held_memo", {})
        uid = replica.replica_id.unique_id
        got = memo.get(uid)
        if got is None or got[0] is not reported:
            got = memo[uid] = (reported, frozenset(reported))
        return got[1]


def router_config() -> Any:
    """The ``request_router_config`` of an engine pool's deployment."""
    from ray.serve.config import RequestRouterConfig

    kwargs: dict[str, Any] = {"request_router_class": ROUTER_CLASS,
                              "request_routing_stats_period_s": 1.0,
                              "request_routing_stats_timeout_s": 5.0}  # fmt: skip
    return RequestRouterConfig(**kwargs)
