"""The engine pool's autoscaling policy: load is queued work and KV pressure, not only
ongoing requests.

Replicas report ``kv_usage`` (fraction of blocks held plus the decode blocks their
admitted requests may still take: ``engine.kv_budget``, what admission counts), ``waiting`` (requests the
scheduler could not admit) and ``running`` through ``record_autoscaling_stats``; Serve
aggregates them over ``look_back_period_s`` and calls ``kv_aware_policy`` each control
period. Serve applies ``min_replicas``/``max_replicas``, the scaling factors and the
up/down delays around it.

Desired replicas = the largest of
- requests / ``target_ongoing_requests``, where requests is the larger of Serve's
  ongoing count and the replicas' own running + waiting (the API processes' requests
  reach engine replicas over TCP links, not Serve calls, so only the replicas know how
  many they hold);
- KV pressure: current × mean KV usage / ``KV_TARGET`` (a pool whose caches are 90 %
  full needs more caches even when its request count looks fine);
- queueing: one more replica while any replica has requests waiting for KV blocks
  or batch slots.

Use it with ``autoscaling_config={"policy": {"policy_function":
"cluster.placement.autoscale:kv_aware_policy"}, ...}`` (``ServeConfig.autoscaling`` does).
"""

from __future__ import annotations

from typing import Any

KV_TARGET = 0.7  # mean KV usage the pool aims at
POLICY = "cluster.placement.autoscale:kv_aware_policy"


def _mean(values: dict[Any, float] | None) -> float:
    return sum(values.values()) / len(values) if values else 0.0


def kv_aware_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    n = ctx.current_num_replicas
    if n == 0:
        return ctx.target_num_replicas, ctx.policy_state
    target = ctx.config.get_target_ongoing_requests()
    metrics = ctx.aggregated_metrics or {}
    kv = _mean(metrics.get("kv_usage"))
    waiting = sum((metrics.get("waiting") or {}).values())
    held = sum((metrics.get("running") or {}).values()) + waiting
    requests = max(float(ctx.total_num_requests), held)
    desired = requests / target if target else n
    desired = max(desired, n * kv / KV_TARGET)
    if waiting >= 1:
        desired = max(desired, n + 1)
    state = dict(ctx.policy_state)
    state["last"] = {"kv_usage": kv, "waiting": waiting, "requests": requests,
                     "desired": desired}  # fmt: skip
    return desired, state


def autoscaling_config(
    min_replicas: int = 1, max_replicas: int = 4, **overrides: Any
) -> dict[str, Any]:
    """A Serve ``autoscaling_config`` for an engine pool with the KV-aware policy."""
    cfg: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 32,
        "metrics_interval_s": 2.0,
        "look_back_period_s": 10.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 120.0,
        "policy": {"policy_function": POLICY},
    }
    cfg.update(overrides)
    return cfg
