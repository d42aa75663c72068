"""Fixtures over real parts: the tiny adapter, trained once per session; PostgreSQL (a throwaway
database per session) and SQLite for the database, Redis for the broker."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from fudlr.data.bundle import Bundle
from fudlr.recommender.train import train_adapter
from tests.conftest import TINY_RECIPE
from tests.integration.harness import require_redis, throwaway_database


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_bundle: Path):
    """A LoRA adapter trained for a few epochs on the tiny bundle (shared, read-only)."""
    out = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    report = train_adapter(tiny_model, Bundle.load(tiny_bundle), out, TINY_RECIPE, device="cpu")
    return out, report


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with throwaway_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_redis()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test on both backends; the PostgreSQL database is emptied before the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fudlr.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import text

    from service.db import make_engine, migrate
    from service.models import Base

    engine = make_engine(url)
    migrate(engine)
    with engine.begin() as connection:
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()
    yield url


@pytest.fixture
def queue_name(redis_url: str) -> Iterator[str]:
    """A Redis queue of this test alone, deleted afterwards."""
    import redis

    name = f"fudlr-test-{secrets.token_hex(4)}"
    yield name
    redis.Redis.from_url(redis_url).delete(name)
