"""What a config asks of Ray, and starting or failing, never hanging.

A deployment whose replicas cannot be placed waits in Serve for resources forever (a
cluster autoscaler may add a node). ``kvserve serve`` must not: on a local Ray it sizes
what it asks for to the machine (``fit_local``: the engine ranks share the cores that
the fronts leave, a front takes ``front_cpus``), refusing at once what the machine
cannot hold (GPUs, custom resources); on any Ray it fails once a deployment has waited
``schedule_timeout_s`` for resources (``wait_running``), naming what each replica needs
and what the cluster has.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

log = logging.getLogger(__name__)

APP_NAME = "kvserve"
POLL_S = 0.5
# Serve's message on a deployment whose replicas wait for resources (after 30 s).
UNSCHEDULED = "to be scheduled"


def pool_replicas(replicas: int, autoscaling: dict[str, Any] | None) -> int:
    """How many replicas a pool starts with."""
    if not autoscaling:
        return replicas
    return max(1, int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas") or 1))


def engine_ranks(cfg: Any) -> int:
    """Engine ranks (a replica, or one of its rank actors) the config starts with."""
    if cfg.mode == "disaggregated":
        return (cfg.pool_tp("prefill") * pool_replicas(cfg.prefill_replicas, cfg.prefill_autoscaling)
                + cfg.pool_tp("decode") * pool_replicas(cfg.decode_replicas,
                                                        cfg.decode_autoscaling))  # fmt: skip
    return cfg.tensor_parallel_size * pool_replicas(cfg.num_replicas, cfg.autoscaling)


def front_replicas(cfg: Any) -> int:
    """Replicas of the API front."""
    return int(cfg.api_replicas)


def demand(cfg: Any, gpu: bool) -> dict[str, float]:
    """The logical resources the config's deployments ask for in all."""
    ranks = engine_ranks(cfg)
    need = {"CPU": ranks * cfg.engine_cpus + front_replicas(cfg) * cfg.front_cpus}
    if gpu:
        need["GPU"] = float(ranks)
    pools = ([cfg.prefill_resources, cfg.decode_resources] if cfg.mode == "disaggregated"
             else [cfg.resources])  # fmt: skip
    for res in pools:
        for name, amount in res.items():
            need[name] = need.get(name, 0.0) + amount
    return need


def fit_local(cfg: Any, have: dict[str, float], gpu: bool) -> Any:
    """``cfg`` for a local Ray with resources ``have``: ``engine_cpus`` lowered (to the
    hundredth) so that every engine rank fits beside the fronts; ``ValueError`` when
    the machine lacks a resource the config needs (a local Ray never grows)."""
    cpus = float(have.get("CPU", 0.0))
    ranks = engine_ranks(cfg)
    fronts = front_replicas(cfg) * cfg.front_cpus
    fit = math.floor((cpus - fronts) / ranks * 100) / 100
    if fit < cfg.engine_cpus:
        if fit < 0.01:
            raise ValueError(f"{ranks} engine ranks and {front_replicas(cfg)} front replicas "
                             f"do not fit in this machine's {cpus:g} CPUs")  # fmt: skip
        log.info("local Ray has %g CPUs: each of the %d engine ranks reserves %g (engine_cpus)",
                 cpus, ranks, fit)  # fmt: skip
        cfg = dataclasses.replace(cfg, engine_cpus=fit)
    short = {k: (v, float(have.get(k, 0.0))) for k, v in demand(cfg, gpu).items()
             if k != "CPU" and v > have.get(k, 0.0)}  # fmt: skip
    if short:
        what = ", ".join(f"{need:g} {k} (it has {got:g})" for k, (need, got) in short.items())
        raise ValueError(f"this machine's Ray cannot hold the deployment: it needs {what}")
    return cfg


def wait_running(timeout_s: float, app: str = APP_NAME) -> None:
    """Waits until Serve runs ``app``. ``RuntimeError`` when a deployment of it failed,
    or when one is still waiting for resources after ``timeout_s`` (0: no limit)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    start = time.monotonic()
    while True:
        status = serve.status().applications.get(app)
        if status is not None:
            if status.status == ApplicationStatus.RUNNING:
                return
            if status.status == ApplicationStatus.DEPLOY_FAILED:
                raise RuntimeError(f"kvserve failed to deploy: {status.message}")
            waiting = [f"{name}: {d.message}" for name, d in status.deployments.items()
                       if UNSCHEDULED in d.message]  # fmt: skip
            if waiting and timeout_s and time.monotonic() - start >= timeout_s:
                raise RuntimeError(
                    f"kvserve could not be placed within {timeout_s:g} s "
                    f"(schedule_timeout_s): {' | '.join(waiting)}"
                )
        time.sleep(POLL_S)
