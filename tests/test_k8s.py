"""The Kubernetes manifests (k8s/), offline: generated files up to date, every overlay
renders with ``kubectl kustomize``, RayServices validate against KubeRay's CRD schema
with unknown keys refused, built-in kinds against Kubernetes' schemas, and each
serveConfigV2 against Serve's schema and kvserve's own application."""

from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.app import GRPC_SERVICERS
from cluster.config import ServeConfig
from k8s import generate as k8s

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "schemas" / "kuberay"
SCHEMAS = SHARED if SHARED.is_dir() else ROOT / "tests" / "data" / "kuberay"
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())


def _crd_schema(kind: str) -> dict[str, Any]:
    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRD not found at {path}")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _closed(version["schema"]["openAPIV3Schema"])


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its
    properties (what kubeconform does with CRDs): misspelled keys fail."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out["additionalProperties"] = False
    return out


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def test_generated_manifests_are_current() -> None:
    assert k8s.main(["--check"]) == 0, "run: python -m k8s.generate"


def test_dockerfile_matches_pinned_ray() -> None:
    import ray

    text = (ROOT / "k8s" / "Dockerfile").read_text()
    pinned = re.search(r"ARG RAY_VERSION=(\S+)", text)
    assert pinned and pinned.group(1) == k8s.RAY_VERSION == ray.__version__
    assert "USER ray" in text  # non-root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    import jsonschema
    import kubernetes_validate

    docs = _render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodMonitor", "RayService"], kinds
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            jsonschema.validate(doc, _crd_schema(doc["kind"]))
            # A misspelled field is refused (the check is not vacuous).
            bad = copy.deepcopy(doc)
            bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, _crd_schema(doc["kind"]))
            # The pod templates inside are real pod specs.
            cluster = doc["spec"]["rayClusterConfig"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                       **{"spec": group["template"]["spec"]}}  # fmt: skip
                kubernetes_validate.validate(pod, "1.32.0", strict=True)
        elif doc["kind"] == "PodMonitor":  # Prometheus Operator's kind: its required shape
            ports = {e["port"] for e in doc["spec"]["podMetricsEndpoints"]}
            assert ports == {"metrics"} and doc["spec"]["selector"]["matchLabels"]
        else:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)


def _rayservice(overlay: str) -> dict[str, Any]:
    return next(d for d in _render(overlay) if d["kind"] == "RayService")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_matches_the_application(overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    rs = _rayservice(overlay)
    doc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    if overlay != "gpu":  # kustomize kept the patch's serveConfigV2 as it is
        patch = yaml.safe_load(
            (ROOT / "k8s" / "overlays" / overlay / "rayservice-patch.yaml").read_text()
        )
        assert rs["spec"]["serveConfigV2"] == patch["spec"]["serveConfigV2"]
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(doc)  # fmt: skip
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    for fn in GRPC_SERVICERS:  # the servicers import
        mod, _, attr = fn.rpartition(".")
        assert callable(getattr(importlib.import_module(mod), attr))
    (app,) = doc["applications"]
    mod, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(mod), attr)
    cfg = ServeConfig(**app["args"])
    built = builder(app["args"])  # the import path builds the application from the args
    assert type(built).__name__ == "Application"
    names = k8s.deployment_names(cfg)
    assert sorted(d["name"] for d in app["deployments"]) == sorted(names)
    assert set(names) == {"api", "prefill", "decode"}  # disaggregated pools
    # Ports: the container ports named serve/grpc are the ones Serve listens on.
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == doc["http_options"]["port"]
    assert ports["grpc"] == doc["grpc_options"]["port"]
    assert ports["dashboard"] == k8s.DASHBOARD_PORT and ports["metrics"] == k8s.METRICS_PORT
    # Each pool's worker group: its marker resource, and GPUs per pod = the pool's TP.
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu = cfg.device.startswith("cuda")
    for pool in ("prefill", "decode"):
        marker = k8s.pool_resource(pool)
        assert marker in getattr(cfg, f"{pool}_resources")
        (group,) = [g for g in groups if marker in g.get("resources", {})]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == (cfg.tensor_parallel_size if gpu else 0)
        auto = getattr(cfg, f"{pool}_autoscaling")
        assert group["minReplicas"] <= auto["min_replicas"] and auto["max_replicas"] >= 1
    if gpu:
        assert {g["groupName"] for g in groups} == {"prefill-gpu", "decode-gpu"}
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
