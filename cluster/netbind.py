"""Serve's gRPC servers and HAProxy's side ports on the HTTP API's host instead of every
interface.

Ray Serve 2.60 binds its gRPC proxy (and, behind HAProxy, the router replicas' own gRPC
servers) to ``[::]`` and has no option for the host; with HAProxy it also binds the
HAProxy stats page (8404) and Prometheus exporter (9101) to every interface. In local
mode kvserve starts Ray with this module's ``bind_grpc_proxy`` as the job's
``worker_process_setup_hook`` and ``KVSERVE_GRPC_HOST`` in its environment, so that
these servers (in workers of that job) listen on the same host as the HTTP API,
127.0.0.1 by default. Joining an existing cluster (``--address``, KubeRay) leaves Serve
as it is: there the pod's network is the boundary.
"""

from __future__ import annotations

import os
import socket
from typing import Any

HOST_ENV = "KVSERVE_GRPC_HOST"
ALL_INTERFACES = "[::]:"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for servers a run or a test starts)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def grpc_address(address: str, host: str) -> str:
    """``[::]:port`` on ``host`` (IPv6 hosts in brackets); other addresses unchanged."""
    if not host or not address.startswith(ALL_INTERFACES):
        return address
    port = address[len(ALL_INTERFACES) :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_grpc_proxy() -> None:
    """Worker setup hook: when ``KVSERVE_GRPC_HOST`` is set, Serve's gRPC servers in this
    process add their port on that host. Idempotent; a no-op elsewhere."""
    host = os.environ.get(HOST_ENV, "")
    if not host:
        return
    from ray.serve._private import default_impl

    if getattr(default_impl.add_grpc_address, "_kvserve", False):
        return
    original = default_impl.add_grpc_address

    def add_grpc_address(grpc_server: Any, server_address: str) -> None:
        original(grpc_server, grpc_address(server_address, host))

    add_grpc_address._kvserve = True  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        from ray.serve._private import haproxy

        haproxy.HAPROXY_CONFIG_TEMPLATE = haproxy_template(haproxy.HAPROXY_CONFIG_TEMPLATE, host)


def haproxy_template(template: str, host: str) -> str:
    """Serve's HAProxy config template with its stats and metrics listeners (bound to
    every interface there) on ``host``; raises if the template no longer has them."""
    h = f"[{host}]" if ":" in host else host
    binds = {
        "bind *:{{ config.stats_port }}": f"bind {h}:{{{{ config.stats_port }}}}",
        "bind :{{ config.metrics_port }}": f"bind {h}:{{{{ config.metrics_port }}}}",
    }
    for old, new in binds.items():
        if old not in template:
            raise RuntimeError(f"Serve's HAProxy template has no {old!r}; netbind needs updating")
        template = template.replace(old, new)
    return template


def runtime_env(host: str) -> dict[str, Any]:
    """The job runtime_env that makes the proxy bind ``host`` (none for all interfaces)."""
    if host in ("", "0.0.0.0", "::"):
        return {}
    return {
        "env_vars": {HOST_ENV: host},
        "worker_process_setup_hook": f"{__name__}.bind_grpc_proxy",
    }
