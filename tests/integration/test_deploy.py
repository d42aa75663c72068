"""No Docker engine runs here: check that docker-compose.yml and the Dockerfile agree with the
code (commands the CLI has, variables the settings read, services the URLs name)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import typer
import yaml

from clients.cli import app
from service.settings import Settings
from tests.integration.harness import ROOT

# variables read outside the service's Settings: the method's caches, the client's target
OTHER_VARIABLES = {
    "FUDLR_CACHE_DIR": ROOT / "fudlr" / "paths.py",
    "FUDLR_MODEL_STORE": ROOT / "fudlr" / "paths.py",
    "FUDLR_URL": ROOT / "clients" / "sdk.py",
    "FUDLR_API_KEY": ROOT / "clients" / "sdk.py",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _parse(command: list[str]) -> click.Context:
    """Parse a `fudlr ...` command line exactly as the CLI would (unknown options fail)."""
    group = typer.main.get_command(app)
    name, *args = command
    with click.Context(group, info_name="fudlr") as parent:
        subcommand = group.get_command(parent, name)
        assert subcommand is not None, f"fudlr has no command '{name}'"
        return subcommand.make_context(name, list(args), parent=parent)


def test_the_services_are_there_and_the_commands_are_real(compose: dict) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    api = _parse(services["api"]["command"])
    assert (
        api.info_name == "serve"
        and api.params["worker"] is False
        and api.params["host"] == "0.0.0.0"
    )
    worker = _parse(services["worker"]["command"])
    assert worker.info_name == "worker" and worker.params["pool"] == "prefork"
    assert services["api"]["depends_on"].keys() >= {"redis", "postgres"}
    port = str(api.params["port"])
    assert any(mapping.endswith(f":{port}") for mapping in services["api"]["ports"])
    assert f":{port}/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def test_the_environment_is_what_the_code_reads(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    for name in ("api", "worker"):
        environment = services[name]["environment"]
        for variable in [v for v in os.environ if v.startswith("FUDLR_")]:
            monkeypatch.delenv(variable)
        for variable, value in environment.items():
            assert variable.startswith("FUDLR_"), variable
            if variable.removeprefix("FUDLR_").lower() not in Settings.model_fields:
                assert variable in OTHER_VARIABLES, f"{name}: nothing reads {variable}"
                assert variable in OTHER_VARIABLES[variable].read_text()
            monkeypatch.setenv(variable, value)
        parsed = Settings()  # as the container reads it: every value valid for its setting
        database, broker = urlparse(parsed.db_url), urlparse(parsed.broker)
        assert database.scheme == "postgresql" and database.hostname == "postgres"
        postgres = services["postgres"]["environment"]
        assert (database.username, database.password, database.path[1:]) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )
        assert broker.scheme == "redis" and broker.hostname == "redis"
        assert parsed.queue == "gpu"
        assert parsed.visibility_timeout_seconds > parsed.lease_seconds
        mounts = dict(volume.split(":")[:2][::-1] for volume in services[name]["volumes"])
        artifact_mount = next(m for m in mounts if str(parsed.artifacts).startswith(m))
        assert mounts[artifact_mount] in compose["volumes"]  # a named volume, shared
        assert all(str(Path(root)) in mounts for root in parsed.model_roots)
    assert services["api"]["volumes"] == services["worker"]["volumes"]


def test_the_worker_reserves_a_gpu_and_the_api_does_not(compose: dict) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert "deploy" not in compose["services"]["api"]
    assert "cu" in compose["services"]["worker"]["build"]["args"]["TORCH_SPEC"]


def test_the_dockerfile_builds_what_compose_runs(compose: dict) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["fudlr"\]$', dockerfile, re.MULTILINE)
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
    default = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    _parse(yaml.safe_load(default.group(1)))
    for name in ("api", "worker"):
        assert compose["services"][name]["build"]["context"] == "."
    assert "ARG TORCH_SPEC" in dockerfile
