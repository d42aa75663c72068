"""Layers that point one way: clients -> (HTTP) -> service -> fudlr, workers -> service -> fudlr.

An upward import would make a client install (`fudlr[client]`) pull the server, or the API
process load the workers' stack; these tests fail on the first such import.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]

# each package, and the packages above it that it must never import
ABOVE = {
    "fudlr": ("service", "workers", "clients", "bench"),
    "service": ("workers", "clients", "bench"),
    "workers": ("clients", "bench"),
}
# the SDK speaks HTTP only; the CLI's commands that run the service import it when they run
HTTP_ONLY = ("clients/sdk.py", "clients/models.py", "clients/embedded.py")
SERVER = ("service", "workers")


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _server_distributions() -> set[str]:
    """What `fudlr[all]` adds to the client install, as distribution names."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    requirements = [r for extra in ("method", "service") for r in extras[extra]]
    names = {_dist(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}
    return names - {"fudlr"}


def _loaded(module: str) -> set[str]:
    """Top-level modules loaded by importing `module` in a fresh interpreter."""
    probe = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {name.partition(".")[0] for name in json.loads(result.stdout)}


def _distributions_of(modules: set[str]) -> set[str]:
    owners = packages_distributions()
    return {_dist(dist) for module in modules for dist in owners.get(module, ())}


@pytest.mark.parametrize(
    ("module", "own"),
    [("clients.sdk", "httpx"), ("clients.cli", "typer"), ("fudlr.repair.config", "pydantic")],
)
def test_the_client_loads_nothing_of_the_server(module: str, own: str) -> None:
    """`import clients.sdk`, `fudlr --help` and the job settings the client's options read
    need only what `fudlr[client]` installs."""
    loaded = _distributions_of(_loaded(module))
    assert own in loaded  # the probe sees third-party imports
    assert not loaded & _server_distributions(), sorted(loaded & _server_distributions())


@pytest.mark.parametrize(
    ("module", "own"), [("service.app", "fastapi"), ("workers.tasks", "celery")]
)
def test_the_api_and_the_worker_start_without_torch(module: str, own: str) -> None:
    """The API never needs torch; a worker initialises it (and CUDA) inside a task only."""
    loaded = _loaded(module)
    assert own in loaded
    assert "torch" not in loaded, f"importing {module} loads torch"


def _imports(source: str) -> list[tuple[str, bool]]:
    """(absolute module imported, whether at module level) for each import in `source`."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
    return found


def _violations() -> list[str]:
    found = []
    for package, above in ABOVE.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, _ in _imports(path.read_text(encoding="utf-8")):
                if name.partition(".")[0] in above:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    for path in sorted((ROOT / "clients").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for name, at_top in _imports(path.read_text(encoding="utf-8")):
            if name.partition(".")[0] in SERVER and (at_top or relative in HTTP_ONLY):
                found.append(f"{relative} imports {name}")
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    assert _violations() == []


def test_the_scan_sees_imports_anywhere() -> None:
    source = "import os\nfrom workers.app import x\ndef f():\n    import service.db\n"
    assert _imports(source) == [("os", True), ("workers.app", True), ("service.db", False)]


def test_the_sdk_models_mirror_the_api_responses() -> None:
    """The SDK's own models read every field the API sends (and nothing it does not)."""
    from clients import models
    from service.base_models.schemas import BaseModelOut
    from service.files.schemas import FileOut
    from service.jobs.schemas import EventOut, JobError, JobMetrics, JobOut
    from service.recommenders.schemas import RecommenderOut, VersionOut
    from service.usage.schemas import UsageOut

    api: list[type[BaseModel]] = [
        BaseModelOut,
        FileOut,
        EventOut,
        JobError,
        JobMetrics,
        JobOut,
        RecommenderOut,
        VersionOut,
        UsageOut,
    ]
    for schema in api:
        mirror = getattr(models, schema.__name__)
        assert list(mirror.model_fields) == list(schema.model_fields), schema.__name__
