"""The cpu-dev overlay's serveConfigV2, deployed with ``serve deploy`` onto a real
multi-node Ray cluster on loopback: a head with no CPUs for work (as in the RayService),
one node standing for the prefill worker group and one for the decode worker group
(each with its group's marker resource). It serves a chat request over HTTP and a gRPC
request, and the prefill and decode replicas run on their own nodes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.common import free_port
from k8s import generate as k8s

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


class LoopbackCluster:
    """``ray start`` nodes of one cluster on this machine, every port chosen free (two
    clusters and several nodes share the host), token authentication on with a token of
    its own; ``stop`` kills the nodes' process groups (never ``ray stop``, which would
    stop every Ray on the machine)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvk8s", dir="/tmp")  # short: unix sockets
        token = Path(self.dir, "token")
        token.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the tests' Ray
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port())]  # fmt: skip

    def start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.dir, f"{name}.log"), "wb")  # noqa: SIM115 (lives with the node)
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                                 "--node-ip-address", "127.0.0.1", *self._ports(), *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.procs.append(proc)

    def head(self) -> None:
        self.start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(self.dashboard_port),
                            "--ray-client-server-port", str(free_port()),
                            "--temp-dir", self.dir])  # fmt: skip
        self.wait_nodes(1)

    def worker(self, name: str, resources: dict[str, float], cpus: int) -> None:
        import json

        n = len(self.procs)
        self.start(name, ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(cpus),
                          "--resources", json.dumps(resources)])  # fmt: skip
        self.wait_nodes(n + 1)

    def get(self, path: str) -> Any:
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text()
        r = httpx.get(self.dashboard + path, headers={"Authorization": f"Bearer {token}"},
                      timeout=30)  # fmt: skip
        r.raise_for_status()
        return r.json()

    def nodes(self) -> list[dict[str, Any]]:
        data = self.get("/api/v0/nodes?detail=1&limit=100")
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a node exited; logs in {self.dir}")
            try:
                if len(self.nodes()) >= n:
                    return
            except (httpx.HTTPError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} nodes did not come up; logs in {self.dir}")
            time.sleep(1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 20
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        for p in self.procs:  # the nodes' children (raylet, gcs, workers) are in the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def multinode() -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster()
    try:
        cluster.head()
        cluster.worker("prefill", {k8s.pool_resource("prefill"): 1000}, cpus=2)
        cluster.worker("decode", {k8s.pool_resource("decode"): 1000}, cpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_serve_deploy_on_a_multinode_cluster(multinode: LoopbackCluster, tmp_path: Path) -> None:
    import grpc

    from protos import kvserve_pb2 as pb
    from protos import kvserve_pb2_grpc

    # The overlay's serveConfigV2 (the generated patch; test_k8s checks that file is current
    # and that kustomize renders it unchanged).
    patch = yaml.safe_load(
        (k8s.ROOT / "overlays" / "cpu-dev" / "rayservice-patch.yaml").read_text()
    )
    doc = yaml.safe_load(patch["spec"]["serveConfigV2"])
    http_port, grpc_port = free_port(), free_port()
    doc["http_options"] = {"host": "127.0.0.1", "port": http_port}  # loopback only here
    doc["grpc_options"]["port"] = grpc_port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    subprocess.run([SERVE, "deploy", str(path), "--address", multinode.dashboard],
                   env=multinode.env, check=True, timeout=120)  # fmt: skip

    deadline = time.monotonic() + 300
    app: dict[str, Any] = {}
    while time.monotonic() < deadline:
        app = multinode.get("/api/serve/applications/")["applications"].get("kvserve", {})
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", app.get("message")
        time.sleep(2)
    assert app.get("status") == "RUNNING", app

    base = f"http://127.0.0.1:{http_port}"
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["kvserve"]["mode"] == "transferred", body["kvserve"]  # prefill → decode

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = kvserve_pb2_grpc.KVServeStub(channel)
        resp = stub.Generate(pb.GenerateRequest(
            text="The capital of France is", sampling=pb.SamplingOptions(max_tokens=4)),
            metadata=(("application", "kvserve"),), timeout=120)  # fmt: skip
    assert resp.choices[0].token_ids and resp.kv.mode in ("transferred", "local")

    # Each pool's replicas run on the node that holds its marker resource.
    nodes = {n["node_id"]: n for n in multinode.nodes()}
    for pool in ("prefill", "decode"):
        replicas = app["deployments"][pool]["replicas"]
        assert replicas, pool
        for rep in replicas:
            total = nodes[rep["node_id"]]["resources_total"]
            assert k8s.pool_resource(pool) in total, (pool, total)
    head = [n for n in nodes.values() if n.get("is_head_node")]
    assert head and "CPU" not in head[0]["resources_total"]  # the head does no work
