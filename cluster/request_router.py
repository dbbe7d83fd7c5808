"""Serve request router of the engine pools, for the Serve calls between replicas
(an API replica's ``core_link``, a decode replica's ``prefill``): calls aimed at one
replica, and load-aware placement of the others.

A call that names its replica with a ``target`` keyword argument goes there; a target
that is no longer a running replica is sent to any replica, which sees that it is not
the target and refuses the call, so the caller learns at once that its instance is
gone. Other calls go to the replica with the least load: what it last reported
through ``record_routing_stats`` (running + waiting) or Serve's count of its ongoing
calls, whichever is larger. A call that carries its prompt's leading block hashes
(``prefix``) goes first to the replica whose prefix cache holds the most of them, while
its load is within ``cluster.placement.affinity.SLACK`` of the least loaded one's; a
call may name replicas to ``avoid`` (a decode replica's quarantined prefill peers):
they get it only when no other replica exists.
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

from cluster.placement import affinity

ROUTER_CLASS = "cluster.request_router:EngineRequestRouter"
TARGET = "target"  # the keyword argument that pins a call to one replica
AVOID = "avoid"  # replicas (unique ids) a call should not go to while others exist
PREFIX = "prefix"  # the prompt's leading block hashes (cluster.placement.affinity)


def load_of(replica: RunningReplica, queue_len: int | None = None) -> float:
    """A replica's load as this process sees it (see the module docstring);
    ``queue_len``: Serve's last probe of its ongoing calls, when known (what counts for
    pools whose requests are whole calls, like the prefill pool)."""
    stats = replica.routing_stats or {}
    reported = float(stats.get("running", 0)) + float(stats.get("waiting", 0))
    return max(reported, float(queue_len or 0))


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
