"""Starting the application: with an API key configured, HTTP needs the Bearer token and
gRPC the metadata, on everything but health; a start whose proxy never comes up leaves
nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import free_port, serving

KEY = "sk-test-kvserve"


def test_api_key_on_http_and_grpc(ray_cluster: Any, tiny_dirs: dict[str, Path]) -> None:  # fmt: skip
    import grpc

    from protos import health_pb2, health_pb2_grpc, kvserve_pb2, kvserve_pb2_grpc

    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny", grpc_port=free_port(),
                 api_key=KEY, engine={"max_model_len": 256}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4}
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        ok = httpx.post(f"{base}/v1/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        reset = httpx.post(f"{base}/reset_prefix_cache", timeout=60)
        assert reset.status_code == 401  # an admin action: the key is required
        reset = httpx.post(f"{base}/reset_prefix_cache", timeout=60,
                           headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert reset.status_code == 200 and reset.json()["instances"]
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as channel:
            stub = kvserve_pb2_grpc.KVServeStub(channel)
            req = kvserve_pb2.GenerateRequest(token_ids=kvserve_pb2.TokenIds(ids=[5, 6, 7]),
                                              sampling=kvserve_pb2.SamplingOptions(max_tokens=4))  # fmt: skip
            try:
                stub.Generate(req, timeout=60)
                raise AssertionError("no key was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            resp = stub.Generate(req, timeout=60, metadata=(("authorization", f"Bearer {KEY}"),))
            assert resp.usage.completion_tokens == 4
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_proxy_that_never_comes_up_leaves_no_controller(
    ray_cluster: Any, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve gives its proxies 60 s and then raises, leaving its controller running: a
    later start would join it and keep the old ports (in CI this once broke 8 tests after
    one slow proxy). ``start_serve`` removes it after each timeout and tries again; the
    next start gets its own ports. The timeout is made 0 s here so that no proxy is in
    time."""
    from ray.serve._private import api
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME

    from cluster.app import start_serve
    from cluster.config import ServeConfig

    monkeypatch.setattr(api, "HTTP_PROXY_TIMEOUT", 0)
    with pytest.raises(TimeoutError):
        start_serve(ServeConfig(device="cpu", http_port=free_port(), grpc_port=free_port()))
    monkeypatch.undo()
    named = ray_cluster.util.list_named_actors(all_namespaces=True)
    assert not [a for a in named if a["name"] == SERVE_CONTROLLER_NAME], named
    with serving(model=str(tiny_dirs["llama3"]), model_name="tiny",
                 engine={"max_model_len": 256}) as cfg:  # fmt: skip
        base = f"http://127.0.0.1:{cfg.http_port}"
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
