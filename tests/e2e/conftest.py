"""A recommender with a planted popularity bias that a debias job reliably repairs, and a
cluster of real processes: `fudlr serve` and `fudlr worker` over PostgreSQL and Redis."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import (
    ROOT,
    FudlrProcess,
    free_port,
    require_redis,
    service_env,
    throwaway_database,
    wait_for,
)

# what makes the tiny planted-bias job succeed (tests/integration/test_repair_job.py), with a
# lenient guard
PLANTED_JOB = {
    "biases": ["item:popularity_group:MGU@1"],
    "budget": {"max_fraction": 0.3, "max_ndcg_drop": 0.9},
    # the grounded protocol the planted test was calibrated on
    "options": {"pool_per_group": 6, "num_beams": 2, "decoding": "grounded"},
}


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_bundle: Path):
    """(bundle, adapter): the tiny bundle plus PLANTED_COPIES samples recommending one
    unpopular item."""
    from fudlr.data.bundle import Bundle
    from fudlr.recommender.train import train_adapter
    from tests.conftest import PLANTED_COPIES, TINY_RECIPE, planted_bundle

    root = tmp_path_factory.mktemp("planted")
    bundle = planted_bundle(tiny_bundle, root / "bundle", copies=PLANTED_COPIES)
    adapter = root / "adapter"
    train_adapter(tiny_model, Bundle.load(bundle), adapter, TINY_RECIPE, device="cpu")
    return bundle, adapter


@dataclass
class Cluster:
    """An API process and worker processes sharing one database, broker and artifact folder."""

    url: str
    key: str
    env: dict[str, str]
    logs: Path
    api: FudlrProcess
    workers: list[FudlrProcess] = field(default_factory=list)

    def start_worker(self) -> FudlrProcess:
        log = self.logs / f"worker-{len(self.workers)}.log"
        worker = FudlrProcess(["worker", "--log-level", "info"], self.env, log)
        self.workers.append(worker)
        return worker

    def client(self):
        from clients.sdk import Client

        return Client(self.url, self.key)

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            process.stop()


def fudlr(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run a `fudlr` command to completion; its stdout, or a failed test with its output."""
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"fudlr {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def start_cluster(settings: dict, root: Path, serve_args: tuple[str, ...]) -> Cluster:
    port = free_port()
    # base models come from the session's temporary folder (the tiny model lives there)
    roots = json.dumps([str(root.parent)])
    env = service_env(
        {**settings, "data_dir": root / "data", "device": "cpu", "model_roots": roots},
        root / "method-cache",
    )
    env["FUDLR_URL"] = f"http://127.0.0.1:{port}"
    api = FudlrProcess(
        ["serve", "--port", str(port), "--log-level", "warning", *serve_args],
        env,
        root / "api.log",
    )

    def ready() -> bool:
        assert api.process.poll() is None, api.tail()
        try:
            return httpx.get(f"{env['FUDLR_URL']}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, timeout=120, what="the API to be ready")
    key = fudlr(env, "keys", "create", "--tenant", "e2e").strip()
    env["FUDLR_API_KEY"] = key
    return Cluster(env["FUDLR_URL"], key, env, root, api)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """PostgreSQL + Redis, `fudlr serve --no-worker`, one `fudlr worker`; short leases."""
    redis_url = require_redis()
    root = tmp_path_factory.mktemp("cluster")
    with throwaway_database() as database_url:
        settings = {
            "database_url": database_url,
            "broker_url": redis_url,
            "queue": f"gpu-e2e-{secrets.token_hex(3)}",
            "lease_seconds": 6,
            "heartbeat_seconds": 1,
            "reaper_interval_seconds": 1,
            "cancel_poll_seconds": 0.2,
            "max_attempts": 3,
        }
        cluster = start_cluster(settings, root, ("--no-worker",))
        cluster.start_worker()
        try:
            yield cluster
        finally:
            cluster.stop()
            import redis

            redis.Redis.from_url(redis_url).delete(settings["queue"])
