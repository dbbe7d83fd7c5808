"""``ServeConfig`` → the Serve application, without starting anything: the API ingress
bound to the pool it calls in each mode, what environment its replicas get, the
settings that are gone, and fitting a local Ray."""

from __future__ import annotations

from dataclasses import fields

import pytest

from cluster.api.ingress import ApiIngress
from cluster.app import build_app
from cluster.config import ServeConfig
from cluster.replica import EngineReplica


def _env(deployment: object) -> dict[str, str]:
    options = deployment.ray_actor_options or {}  # type: ignore[attr-defined]
    return dict(options.get("runtime_env", {}).get("env_vars", {}))


@pytest.mark.parametrize(("mode", "pool_name", "roles"),
                         [("colocated", "engine", ("both",)), ("disaggregated", "decode", ("decode",))])  # fmt: skip
def test_the_api_ingress_fronts_every_mode(
    mode: str, pool_name: str, roles: tuple[str, ...]
) -> None:
    """The API replicas are the one ingress, bound to the pool they send requests to
    (colocated, or decode: its replicas call the prefill pool); they get the API key
    and ``api_env``; every setting reaches its process as an argument."""
    cfg = ServeConfig(device="cpu", api_key="k", mode=mode, api_replicas=3,
                      api_env={"NCCL_DEBUG": "WARN"}, failover_timeout_s=2.0,
                      core_host="10.0.0.1", tensor_parallel_size=2,
                      faults={"step_delay_s": 0.5}, pd={"prefill_attempts": 3})  # fmt: skip
    front = build_app(cfg)._bound_deployment
    assert front.name == "api" and issubclass(front.func_or_class, ApiIngress)
    assert front._deployment_config.num_replicas == 3
    env = _env(front)
    assert env["NCCL_DEBUG"] == "WARN" and "KVSERVE_API_KEY" not in env  # not in the env
    pool_app, front_cfg = front.init_args
    assert front_cfg == cfg and front_cfg.api_roles == roles and front_cfg.api_key == "k"
    pool = pool_app._bound_deployment
    assert pool.name == pool_name and issubclass(pool.func_or_class, EngineReplica)
    assert pool.init_args[2] == roles[0] and pool.init_args[-1] == "10.0.0.1"  # core_host
    assert pool.init_kwargs["faults"].step_delay_s == 0.5  # sections: mappings → dataclasses
    assert cfg.pd.prefill_attempts == 3 and ServeConfig.from_dict(cfg.to_dict()) == cfg
    assert ServeConfig().core_bind == "127.0.0.1"  # a loopback API keeps the cores there
    assert ServeConfig(host="0.0.0.0").core_bind == ""  # else each node's own address


def test_removed_settings_name_their_replacement() -> None:
    for name, value, match in (("ingress", "engine", "one front"),
                               ("engine_process", True, "thread of its replica"),
                               ("router_replicas", 2, "api_replicas"),
                               ("router_env", {}, "api_env")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ServeConfig.from_dict({name: value})
    with pytest.raises(ValueError, match="unknown settings"):
        ServeConfig.from_dict({"no_such_setting": 1})
    with pytest.raises(ValueError, match="api_replicas"):
        ServeConfig(api_replicas=0)
    with pytest.raises(AttributeError):  # frozen: validated once, changed by nobody
        ServeConfig().api_replicas = 3  # type: ignore[misc]


def test_fit_local_shares_the_cores_and_refuses_what_is_missing() -> None:
    """On a local Ray of 2 CPUs every mode fits: the engine ranks share what the fronts
    leave; a resource the machine lacks is refused at once."""
    from cluster.capacity import demand, fit_local

    have = {"CPU": 2.0}
    for cfg in (ServeConfig(mode="disaggregated"), ServeConfig(tensor_parallel_size=2),
                ServeConfig(mode="disaggregated", tensor_parallel_size=2),
                ServeConfig(api_replicas=2)):  # fmt: skip
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


def test_settings_table_help_and_set_come_from_the_fields() -> None:
    """Every setting has a doc line; docs/serving.md's table, ``kvserve serve --help``
    and ``python -m cluster.config`` are the same text; ``--set`` reaches any field,
    sections included, through the one validating ``from_dict``."""
    from pathlib import Path

    from cluster.cli import parser
    from cluster.config import PDConfig, apply_settings, config_table, field_docs

    for cls in (ServeConfig, PDConfig):
        docs = field_docs(cls)
        assert all(docs.get(f.name) for f in fields(cls)), docs
    table = config_table()
    doc = Path(__file__).parents[1] / "docs" / "serving.md"
    assert table in doc.read_text(), "docs/serving.md's table is stale: python -m cluster.config"
    assert table in parser()._subparsers._group_actions[0].choices["serve"].epilog  # type: ignore[union-attr]
    data = apply_settings({}, ["api_replicas=4", "pd.prefill_attempts=3", "haproxy=false",
                               "engine={max_model_len: 512}"])  # fmt: skip
    cfg = ServeConfig.from_dict(data)
    assert (cfg.api_replicas, cfg.pd.prefill_attempts, cfg.haproxy) == (4, 3, False)
    assert cfg.engine == {"max_model_len": 512}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        apply_settings({}, ["api_replicas"])
    with pytest.raises(ValueError, match="'ingress' is gone"):
        ServeConfig.from_dict(apply_settings({}, ["ingress=engine"]))


def test_the_environment_gives_only_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """``with_env``: KVSERVE_API_KEY (a Kubernetes Secret) fills an unset ``api_key``; a
    key in the settings wins; nothing else comes from the environment."""
    from cluster.config import with_env

    monkeypatch.delenv("KVSERVE_API_KEY", raising=False)
    assert with_env({"mode": "colocated"}) == {"mode": "colocated"}
    monkeypatch.setenv("KVSERVE_API_KEY", "from-secret")
    assert ServeConfig.from_dict(with_env({})).api_key == "from-secret"
    assert with_env({"api_key": "mine"})["api_key"] == "mine"
