"""``ServeConfig`` → the Serve application, without starting anything: which deployment
is the ingress, and what environment its replicas get (``ServeConfig.ingress``)."""

from __future__ import annotations

import pytest

from cluster.app import ENGINE_INGRESS_ENV, ServeConfig, build_app
from cluster.replica import EngineIngress, EngineReplica
from cluster.router import Router


def _env(deployment: object) -> dict[str, str]:
    options = deployment.ray_actor_options or {}  # type: ignore[attr-defined]
    return dict(options.get("runtime_env", {}).get("env_vars", {}))


def test_router_ingress_is_the_default() -> None:
    app = build_app(ServeConfig(device="cpu", api_key="k"))
    router = app._bound_deployment
    assert router.name == "router" and issubclass(router.func_or_class, Router)
    assert _env(router) == {"KVSERVE_API_KEY": "k"}  # the key goes where the API runs
    (engine,) = router.init_args[:1]  # the pool's application, bound to the router
    pool = engine._bound_deployment
    assert pool.name == "engine" and not issubclass(pool.func_or_class, EngineIngress)
    assert issubclass(pool.func_or_class, EngineReplica)


@pytest.mark.parametrize("mode,name", [("colocated", "engine"), ("disaggregated", "decode")])
def test_engine_ingress_serves_the_api_itself(mode: str, name: str) -> None:
    """No router: the pool the API calls (colocated, or decode) is the ingress; its
    replicas get the API key and ``ENGINE_INGRESS_ENV``, which the pool's env overrides."""
    own = {"KVSERVE_GIL_SWITCH_INTERVAL_S": "0.001"}
    cfg = ServeConfig(device="cpu", api_key="k", ingress="engine", mode=mode,
                      **({"decode_env": own} if mode == "disaggregated" else {"env": own}))  # fmt: skip
    pool = build_app(cfg)._bound_deployment
    assert pool.name == name and issubclass(pool.func_or_class, EngineIngress)
    env = _env(pool)
    assert env["KVSERVE_API_KEY"] == "k"
    assert env["KVSERVE_GIL_SWITCH_INTERVAL_S"] == "0.001"  # the pool's own wins
    assert (
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"]
        == (ENGINE_INGRESS_ENV["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"])
    )


def test_bad_ingress_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ingress must be one of"):
        ServeConfig(ingress="proxy")
    with pytest.raises(ValueError, match="no router"):
        ServeConfig(ingress="engine", router_replicas=2)


def test_engine_process_reaches_the_colocated_replicas() -> None:
    """``engine_process`` reaches the colocated pool's replicas (their seventh argument;
    the eighth, ``api_links``, only with ``ingress="api"``, which implies it); the
    disaggregated pools and TP > 1 refuse it (their engine must be in the replica)."""
    for ingress in ("router", "engine", "api"):
        app = build_app(ServeConfig(device="cpu", ingress=ingress, engine_process=ingress != "api",
                                    api_replicas=3))  # fmt: skip
        front = app._bound_deployment
        pool = front if ingress == "engine" else front.init_args[0]._bound_deployment
        assert pool.init_args[6] is True and pool.init_args[2] == "both"
        assert pool.init_args[7] is (ingress == "api")
        if ingress == "api":
            assert front.name == "api" and front._deployment_config.num_replicas == 3
            assert front.init_args[1:] == ("SmolLM2-135M-Instruct", 256 + 1024, 0.0)
    for bad, match in (({"mode": "disaggregated"}, "colocated pool at TP 1"),
                       ({"tensor_parallel_size": 2}, "colocated pool at TP 1"),
                       ({"api_replicas": 0}, "api_replicas"),
                       ({"router_replicas": 2}, "no router"),
                       ({"autoscaling": {"min_replicas": 1}}, "no autoscaling")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ServeConfig(ingress="api", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="api_links"):
        EngineReplica.__init__(object.__new__(EngineReplica), {}, "m", api_links=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="colocated pool at TP 1"):
        ServeConfig(engine_process=True, mode="disaggregated")
    with pytest.raises(ValueError, match="colocated pool at TP 1"):
        ServeConfig(engine_process=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="colocated pool only"):
        EngineReplica.__init__(object.__new__(EngineReplica), {}, "m", "decode", 0.0,  # type: ignore[arg-type]
                               prefill=object(), engine_process=True)  # fmt: skip
