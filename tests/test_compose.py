"""docker-compose.yml describes the local cluster, and every service starts a real entry point.
(No Docker engine runs here: the file is parsed and each command is resolved, not run.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click
import pytest
import yaml

from hydraserve.cli import main as cli
from tests.conftest import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = {name: s for name, s in SERVICES.items() if s.get("image", "").startswith("hydraserve")}


def test_cluster_shape():
    assert {"postgres", "rabbitmq", "migrate", "api", "scheduler", "store"} <= set(SERVICES)
    nodes = [n for n in SERVICES if n.startswith("node")]
    assert len(nodes) == 4
    ids = [SERVICES[n]["command"][SERVICES[n]["command"].index("--node-id") + 1] for n in nodes]
    assert len(set(ids)) == 4, ids
    for n in nodes:  # each node advertises its own host name for stage channels
        assert SERVICES[n]["environment"]["HYDRA_NODE_HOST"] == n


@pytest.mark.parametrize("name", sorted(OURS))
def test_service_runs_a_real_entry_point(name):
    service = OURS[name]
    argv = service["command"]
    env = service["environment"]
    assert env["HYDRA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["HYDRA_BROKER_URL"].startswith("amqp://")
    if argv[0] == "gunicorn":
        target = argv[-1]
        module, _, attr = target.partition(":")
        assert importlib.util.find_spec(module) is not None, target
        assert attr == "app"
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert f"{attr} = " in source
        conf = argv[argv.index("-c") + 1]
        assert conf.startswith("python:"), conf
        assert importlib.util.find_spec(conf.removeprefix("python:")) is not None, conf
        return
    assert argv[0] == "hydraserve", argv
    # click resolves the sub-command and parses its options exactly as the container would
    with cli.make_context("hydraserve", list(argv[1:]), resilient_parsing=False) as ctx:
        sub = cli.get_command(ctx, argv[1])
        assert isinstance(sub, click.Command), argv
        args = argv[2:]
        while isinstance(sub, click.Group):
            sub, args = sub.get_command(ctx, args[0]), args[1:]
        sub.make_context(argv[1], list(args))


def test_dockerfile_copies_what_exists():
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    copied = [p for line in lines if line.startswith("COPY") for p in line.split()[1:-1]]
    assert copied and all((REPO_ROOT / p).exists() for p in copied), copied


def test_prometheus_scrapes_the_api_and_every_node():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["api"]["authorization"]["credentials"] == "change-this-admin-key"
    assert "change-this-admin-key" in SERVICES["api"]["environment"]["HYDRA_ADMIN_KEY"]
    nodes = sorted(n for n in SERVICES if n.startswith("node"))
    ports = {SERVICES[n]["command"][SERVICES[n]["command"].index("--metrics-port") + 1]
             for n in nodes}
    assert jobs["nodes"]["static_configs"][0]["targets"] == [f"{n}:{p}" for n in nodes
                                                             for p in ports]
    mounted = SERVICES["prometheus"]["volumes"][0].split(":")[0]
    assert (REPO_ROOT / mounted).resolve() == (REPO_ROOT / "deploy" / "prometheus.yml")
