"""A service that holds under load and hostile input: concurrency beyond the database pool,
values the database cannot store, archives and data files that cost more than they say,
and answers that must not reveal the server's files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from bench.load import seed_job
from service.settings import Settings
from tests.integration.harness import InProcessServer, api_key


@pytest.fixture
def small_pool(tmp_path: Path, database_url: str):
    """A server whose pool is far smaller than the thread pool and the clients."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        db_pool_size=6,
        max_concurrent_requests=2,
        reaper_interval_seconds=3600,
    )
    key = api_key(settings, "load")
    job = seed_job(settings.db_url, "load")
    with InProcessServer(settings) as server:
        yield server, key, job


def test_many_pollers_on_a_small_pool_are_all_answered(small_pool) -> None:
    """More requests in flight than connections once deadlocked every request until the
    pool's timeout; now they wait their turn and /healthz answers meanwhile."""
    server, key, job = small_pool

    async def run() -> tuple[list[int], float]:
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

            async def poll() -> int:
                return (await client.get(f"/v1/jobs/{job}", headers=headers)).status_code

            polls = [asyncio.create_task(poll()) for _ in range(120)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            health = await client.get("/healthz")
            waited = time.monotonic() - started
            assert health.status_code == 200
            return list(await asyncio.gather(*polls)), waited

    statuses, health_seconds = asyncio.run(asyncio.wait_for(run(), 60))
    assert statuses == [200] * len(statuses)
    assert health_seconds < 5
