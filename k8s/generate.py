"""KubeRay manifests generated from the code's own values (``python -m k8s.generate``).

Writes, under ``k8s/``:

- ``base/rayservice.yaml``: the ``RayService`` of the ``gpu`` profile (disaggregated:
  a head with no work of its own, worker groups ``prefill-gpu`` and ``decode-gpu`` with
  as many GPUs per pod as each pool's TP size, autoscaler v2);
- ``overlays/<profile>/rayservice-patch.yaml`` for every other profile (``cpu-dev``):
  its serveConfigV2 and worker groups.

Nothing here is typed twice: ports, the application's import path and deployment names,
the gRPC servicers and the pools' TP sizes and resources come from ``cluster.app``; the
serveConfigV2 is a ``ServeDeploySchema`` document whose ``args`` are ``ServeConfig``
fields. ``--check`` exits 1 if a file on disk differs from what would be written (the
test suite runs it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.app import GRPC_SERVICERS, build, build_app
from cluster.config import ServeConfig
from cluster.placement.autoscale import autoscaling_config

ROOT = Path(__file__).resolve().parents[1] / "k8s"
IMPORT_PATH = f"{build.__module__}:{build.__name__}"
APP_NAME = "kvserve"
RAY_VERSION = "2.60.0"
IMAGE = "kvserve"  # overlays pin the registry and tag with kustomize's ``images:``
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
GCS_PORT = 6379
CLIENT_PORT = 10001
POOL_GROUPS = {"prefill": "prefill-gpu", "decode": "decode-gpu"}
MODELS_MOUNT = "/models"


@dataclass(frozen=True)
class Group:
    """One pool's worker group: pod size and replica bounds (GPUs per pod: the pool's
    TP size, from the profile's ServeConfig)."""

    cpu: str
    memory: str
    min_replicas: int
    max_replicas: int
    replicas: int = 1


@dataclass(frozen=True)
class Profile:
    name: str
    serve: ServeConfig
    head_cpu: str
    head_memory: str
    prefill: Group
    decode: Group
    gpu: bool
    models_volume: bool


def pool_resource(pool: str) -> str:
    """The custom Ray resource that marks the nodes of ``pool``'s worker group."""
    return f"kvserve_{pool}"


def profiles() -> dict[str, Profile]:
    marker = 0.01  # each replica (and each TP bundle) takes a little of its pool's marker
    gpu_serve = ServeConfig(
        model=f"{MODELS_MOUNT}/model", device="cuda", mode="disaggregated",
        tensor_parallel_size=1, http_port=8000, grpc_port=9000, core_host="",
        prefill_autoscaling=autoscaling_config(1, 4, target_ongoing_requests=16),
        decode_autoscaling=autoscaling_config(1, 8, target_ongoing_requests=64),
        prefill_resources={pool_resource("prefill"): marker},
        decode_resources={pool_resource("decode"): marker},
        engine={"dtype": "bfloat16", "gpu_memory_utilization": 0.9, "max_model_len": 8192},
    )  # fmt: skip
    cpu_serve = ServeConfig(
        model=None, device="cpu", mode="disaggregated", http_port=8000, grpc_port=9000,
        core_host="", prefill_autoscaling=autoscaling_config(1, 2), decode_autoscaling=autoscaling_config(1, 2),
        prefill_resources={pool_resource("prefill"): marker},
        decode_resources={pool_resource("decode"): marker},
        engine={"max_model_len": 2048},
    )  # fmt: skip
    return {
        "gpu": Profile(
            "gpu",
            gpu_serve,
            "4",
            "16Gi",
            Group("16", "128Gi", 1, 4),
            Group("16", "128Gi", 1, 8),
            gpu=True,
            models_volume=True,
        ),
        "cpu-dev": Profile(
            "cpu-dev",
            cpu_serve,
            "1",
            "4Gi",
            Group("2", "6Gi", 1, 2),
            Group("2", "6Gi", 1, 2),
            gpu=False,
            models_volume=False,
        ),
    }


# --- serveConfigV2 ------------------------------------------------------------------------------
def serve_args(cfg: ServeConfig) -> dict[str, Any]:
    """The ``args`` of the application: every ServeConfig field that differs from its
    default (ports and hosts live in http_options / grpc_options instead)."""
    default = ServeConfig().to_dict()
    skip = {"host", "http_port", "grpc_port"}
    return {k: v for k, v in cfg.to_dict().items() if k not in skip and v != default[k]}


def deployment_names(cfg: ServeConfig) -> list[str]:
    """The deployments the application builds for ``cfg``, ingress first."""
    from ray.serve.deployment import Application

    names: list[str] = []

    def walk(app: Any) -> None:
        d = app._bound_deployment
        names.append(d.name)
        for arg in [*d.init_args, *d.init_kwargs.values()]:
            if isinstance(arg, Application):
                walk(arg)

    walk(build_app(cfg))
    return names


def serve_config(cfg: ServeConfig) -> dict[str, Any]:
    """A ``ServeDeploySchema`` document deploying kvserve for ``cfg``. Each pool's
    deployment lists its autoscaling config, where operators tune it."""
    deployments = []
    for name in deployment_names(cfg):
        entry: dict[str, Any] = {"name": name}
        auto = {"prefill": cfg.prefill_autoscaling, "decode": cfg.decode_autoscaling,
                "engine": cfg.autoscaling}.get(name)  # fmt: skip
        if auto:
            entry["autoscaling_config"] = auto
        deployments.append(entry)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.http_port},
        "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": serve_args(cfg), "deployments": deployments}],
    }  # fmt: skip


# --- RayService -----------------------------------------------------------------------------------
def _container(name: str, cpu: str, memory: str, gpus: int, ports: list[tuple[str, int]],
               profile: Profile, head: bool) -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "resources": {"requests": dict(res), "limits": dict(res)},
        "env": [{"name": "KVSERVE_API_KEY",
                 "valueFrom": {"secretKeyRef": {"name": "kvserve-api-key", "key": "api-key",
                                                "optional": True}}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                            "allowPrivilegeEscalation": False},
    }  # fmt: skip
    if head:
        c["readinessProbe"] = {"httpGet": {"path": "/api/gcs_healthz", "port": DASHBOARD_PORT},
                               "periodSeconds": 5, "failureThreshold": 10}  # fmt: skip
    else:
        c["readinessProbe"] = {"httpGet": {"path": "/-/healthz", "port": profile.serve.http_port},
                               "periodSeconds": 5, "failureThreshold": 10}  # fmt: skip
    c["livenessProbe"] = {"tcpSocket": {"port": "metrics"}, "initialDelaySeconds": 30,
                          "periodSeconds": 10, "failureThreshold": 6}  # fmt: skip
    mounts: list[dict[str, Any]] = [{"name": "cache", "mountPath": "/home/ray/.cache"}]
    if profile.models_volume and not head:
        mounts.insert(0, {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    c["volumeMounts"] = mounts
    return c


def _pod(container: dict[str, Any], profile: Profile, head: bool) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "cache", "emptyDir": {}}]
    if profile.models_volume and not head:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": "kvserve-models",
                                                                    "readOnly": True}})  # fmt: skip
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes,
                            "securityContext": {"fsGroup": 1000}}  # fmt: skip
    if profile.gpu and not head:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "kvserve"}}, "spec": spec}


def _serve_ports(cfg: ServeConfig) -> list[tuple[str, int]]:
    return [("serve", cfg.http_port), ("grpc", cfg.grpc_port), ("metrics", METRICS_PORT)]


def worker_groups(profile: Profile) -> list[dict[str, Any]]:
    cfg = profile.serve
    groups = []
    for pool, size in (("prefill", profile.prefill), ("decode", profile.decode)):
        gpus = cfg.pool_tp(pool) if profile.gpu else 0
        name = POOL_GROUPS[pool] if profile.gpu else f"{pool}-cpu"
        container = _container("ray-worker", size.cpu, size.memory, gpus, _serve_ports(cfg),
                               profile, head=False)  # fmt: skip
        groups.append({
            "groupName": name,
            "replicas": size.replicas,
            "minReplicas": size.min_replicas,
            "maxReplicas": size.max_replicas,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            # Each pool's replicas need a little of this resource: they land here only.
            "resources": {pool_resource(pool): "1000"},
            "template": _pod(container, profile, head=False),
        })  # fmt: skip
    return groups


def rayservice(profile: Profile) -> dict[str, Any]:
    cfg = profile.serve
    head_ports = [("gcs", GCS_PORT), ("dashboard", DASHBOARD_PORT), ("client", CLIENT_PORT),
                  *_serve_ports(cfg)]  # fmt: skip
    head = _container("ray-head", profile.head_cpu, profile.head_memory, 0, head_ports, profile,
                      head=True)  # fmt: skip
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "kvserve", "labels": {"app.kubernetes.io/name": "kvserve"}},
        "spec": {
            "serveConfigV2": dump(serve_config(cfg)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "version": "v2",
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 120,
                },
                "headGroupSpec": {
                    # The head runs Ray's control plane, Serve's controller and a proxy;
                    # no replica or task is scheduled on it.
                    "rayStartParams": {
                        "num-cpus": "0",
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": _pod(head, profile, head=True),
                },
                "workerGroupSpecs": worker_groups(profile),
            },
        },
    }


def patch(profile: Profile) -> dict[str, Any]:
    """Strategic-merge patch turning the base (gpu) RayService into ``profile``'s (lists of
    a custom resource are replaced whole, so the worker groups are all here)."""
    full = rayservice(profile)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "kvserve"},
        "spec": {
            "serveConfigV2": full["spec"]["serveConfigV2"],
            "rayClusterConfig": {
                "headGroupSpec": full["spec"]["rayClusterConfig"]["headGroupSpec"],
                "workerGroupSpecs": full["spec"]["rayClusterConfig"]["workerGroupSpecs"],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the serveConfigV2) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


HEADER = "# Generated by `python -m k8s.generate` from cluster/app.py and k8s/generate.py; do not edit.\n"


def files() -> dict[Path, str]:
    out: dict[Path, str] = {}
    profs = profiles()
    out[ROOT / "base" / "rayservice.yaml"] = HEADER + dump(rayservice(profs["gpu"]))
    for name, prof in profs.items():
        if name == "gpu":
            continue
        out[ROOT / "overlays" / name / "rayservice-patch.yaml"] = HEADER + dump(patch(prof))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k8s.generate", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    args = p.parse_args(argv)
    stale = []
    for path, text in files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python -m k8s.generate):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
