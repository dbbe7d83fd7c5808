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


def test_fit_local_shares_the_cores_and_refuses_what_is_missing() -> None:
    """On a local Ray of 2 CPUs every mode fits: the engine ranks share what the fronts
    leave; a resource the machine lacks is refused at once."""
    from cluster.capacity import demand, fit_local

    have = {"CPU": 2.0}
    for cfg in (ServeConfig(mode="disaggregated"), ServeConfig(tensor_parallel_size=2),
                ServeConfig(mode="disaggregated", tensor_parallel_size=2),
                ServeConfig(ingress="api", api_replicas=2)):  # fmt: skip
        fit = fit_local(cfg, have, gpu=False)
        assert 0 < fit.engine_cpus <= 1.0
        assert demand(fit, gpu=False)["CPU"] <= 2.0
    assert fit_local(ServeConfig(), {"CPU": 16.0}, gpu=False).engine_cpus == 1.0  # room: as is
    with pytest.raises(ValueError, match="needs 1 GPU"):
        fit_local(ServeConfig(), have, gpu=True)
    with pytest.raises(ValueError, match=r"needs 0\.5 pool-node"):
        fit_local(ServeConfig(resources={"pool-node": 0.5}), have, gpu=False)


def test_an_unplaceable_deployment_fails_within_its_timeout(ray_cluster: object) -> None:
    """On a Ray that kvserve joined (no sizing), a pool whose replicas wait for a resource
    no node has fails once Serve reports the wait, naming the resource."""
    import time

    from ray import serve

    from tests.factories import serving

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="kvserve-absent"):  # noqa: SIM117
        with serving(resources={"kvserve-absent": 1.0}, schedule_timeout_s=1.0):
            pass
    assert time.monotonic() - t0 < 90
    assert "kvserve" not in serve.status().applications
