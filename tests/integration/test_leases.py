"""Leases, the reaper and cancellation polling on SQLite and the real PostgreSQL, with task
messages sent to the real Redis broker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from service.db import make_engine, migrate, new_id, session_factory, transaction, utcnow
from service.jobs.service import cancel_job
from service.models import Event, File, Job, Recommender, RegisteredModel, Tenant, Version
from service.queue import TaskQueue, create_celery
from service.reaper import reap
from service.settings import Settings
from workers.leases import Lease


@pytest.fixture
def world(database_url: str, redis_url: str, queue_name: str, tmp_path: Path):
    """Settings with short leases, a migrated database, a real Redis queue of its own."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        broker_url=redis_url,
        queue=queue_name,
        lease_seconds=30,
        max_attempts=2,
        cancel_poll_seconds=1.0,
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    sessions = session_factory(engine)
    queue = TaskQueue(create_celery(settings), settings.queue)
    yield settings, engine, sessions, queue
    engine.dispose()


def _job(sessions) -> str:
    """A queued job on a ready version, with every row it refers to."""
    ids = {prefix: new_id(prefix) for prefix in ("ten", "bm", "file", "rec", "ver", "job")}
    with transaction(sessions) as session:
        session.add(Tenant(id=ids["ten"], name=ids["ten"]))
        session.flush()
        session.add(
            RegisteredModel(
                id=ids["bm"], tenant_id=ids["ten"], name="m", path="/m", digest="0" * 64, details={}
            )
        )
        session.add(
            File(
                id=ids["file"],
                tenant_id=ids["ten"],
                purpose="adapter",
                filename="a.tar.gz",
                bytes=1,
                sha256="0" * 64,
                details={},
            )
        )
        session.flush()
        session.add(
            Recommender(
                id=ids["rec"],
                tenant_id=ids["ten"],
                name="r",
                base_model_id=ids["bm"],
                adapter_file_id=ids["file"],
                data={},
                bundle_digest="0" * 64,
                index_options={},
            )
        )
        session.flush()
        session.add(
            Version(
                id=ids["ver"],
                tenant_id=ids["ten"],
                recommender_id=ids["rec"],
                number=1,
                digest="0" * 64,
                bytes=1,
                state="ready",
            )
        )
        session.add(
            Job(
                id=ids["job"],
                tenant_id=ids["ten"],
                recommender_id=ids["rec"],
                version=1,
                state="queued",
                spec={},
            )
        )
    return ids["job"]


def _expire(sessions, job_id: str) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _job_row(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get_one(Job, job_id)


def test_a_claim_is_won_once(world) -> None:
    settings, _, sessions, _ = world
    job_id = _job(sessions)
    first = Lease.claim(sessions, Job, job_id, settings)
    second = Lease.claim(sessions, Job, job_id, settings)  # a duplicate delivery
    assert first is not None and second is None
    row = _job_row(sessions, job_id)
    assert (row.state, row.attempts, row.lease_owner) == ("running", 1, first.owner)
    assert row.lease_expires_at > utcnow() + timedelta(seconds=20)


def test_concurrent_deliveries_race_and_exactly_one_claims(world) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    settings, _, sessions, _ = world
    job_id = _job(sessions)
    start = Barrier(6)

    def deliver(_: int) -> Lease | None:
        start.wait()
        return Lease.claim(sessions, Job, job_id, settings)

    with ThreadPoolExecutor(6) as pool:
        leases = list(pool.map(deliver, range(6)))
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    assert _job_row(sessions, job_id).lease_owner == winners[0].owner


def test_a_lost_lease_stops_the_work_and_blocks_its_writes(world) -> None:
    settings, _, sessions, _ = world
    job_id = _job(sessions)
    lease = Lease.claim(sessions, Job, job_id, settings)
    before = _job_row(sessions, job_id).lease_expires_at
    lease.renew()
    assert _job_row(sessions, job_id).lease_expires_at >= before and not lease.lost
    assert not lease.cancelled()

    with transaction(sessions) as session:  # the reaper gave the job to someone else
        session.execute(update(Job).where(Job.id == job_id).values(lease_owner="other"))
    lease.renew()
    assert lease.lost and lease.cancelled()
    with transaction(sessions) as session:
        assert not lease.finish(session, "succeeded", "must not happen")
    assert _job_row(sessions, job_id).state == "running"


def test_the_reaper_requeues_an_expired_lease_then_gives_up(world) -> None:
    settings, _, sessions, queue = world
    job_id = _job(sessions)
    for attempt in (1, 2):
        lease = Lease.claim(sessions, Job, job_id, settings)
        assert lease is not None and lease.attempt == attempt
        _expire(sessions, job_id)
        assert reap(sessions, settings, queue) == ([job_id] if attempt == 1 else [])

    row = _job_row(sessions, job_id)
    assert row.state == "failed" and row.lease_owner is None
    assert row.error["code"] == "worker_lost" and "2 times" in row.error["detail"]
    assert queue.depth() == 1  # the one requeue reached Redis
    assert Lease.claim(sessions, Job, job_id, settings) is None
    with sessions() as session:
        messages = session.scalars(select(Event.message).where(Event.subject_id == job_id)).all()
    assert any("requeued" in message for message in messages)


def test_an_index_build_is_taken_back_the_same_way(world) -> None:
    settings, _, sessions, queue = world
    job_id = _job(sessions)
    with transaction(sessions) as session:
        version = session.scalars(
            select(Version)
            .join(Job, Job.recommender_id == Version.recommender_id)
            .where(Job.id == job_id)
        ).one()
        version.state = "indexing"
        version_id = version.id
    lease = Lease.claim(sessions, Version, version_id, settings)
    assert lease is not None and Lease.claim(sessions, Version, version_id, settings) is None
    with transaction(sessions) as session:
        session.execute(
            update(Version)
            .where(Version.id == version_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert reap(sessions, settings, queue) == [version_id]
    with sessions() as session:
        row = session.get_one(Version, version_id)
    assert (row.state, row.lease_owner, row.attempts) == ("indexing", None, 1)
    assert queue.depth() == 1
    assert Lease.claim(sessions, Version, version_id, settings).attempt == 2


def test_a_cancelled_job_whose_worker_died_ends_cancelled(world) -> None:
    settings, _, sessions, queue = world
    job_id = _job(sessions)
    Lease.claim(sessions, Job, job_id, settings)
    with sessions() as session:
        assert cancel_job(session, session.get_one(Job, job_id)).state == "cancelling"
    _expire(sessions, job_id)
    reap(sessions, settings, queue)
    assert _job_row(sessions, job_id).state == "cancelled"
    assert queue.depth() == 0


def test_a_send_that_never_happened_is_retried(world) -> None:
    settings, _, sessions, queue = world
    job_id = _job(sessions)
    with transaction(sessions) as session:  # committed, but the API died before sending
        session.execute(
            update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(minutes=1))
        )
    assert reap(sessions, settings, queue) == [job_id]
    assert queue.depth() == 1 and _job_row(sessions, job_id).enqueued_at is not None
    assert reap(sessions, settings, queue) == []


def test_cancellation_is_polled_at_most_once_per_interval(world) -> None:
    settings, engine, sessions, _ = world
    job_id = _job(sessions)
    lease = Lease.claim(sessions, Job, job_id, settings)
    selects = []

    def count(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "jobs" in statement:
            selects.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert not any(lease.cancelled() for _ in range(200))
        assert len(selects) == 1
        with sessions() as session:
            cancel_job(session, session.get_one(Job, job_id))
        lease._polled -= settings.cancel_poll_seconds  # the next poll is due
        assert lease.cancelled()
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_migrations_match_the_models_and_go_down_and_up(world) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    from service.db import MIGRATIONS
    from service.models import Base

    _, engine, _, _ = world
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(engine)
    assert {"jobs", "versions", "events", "api_keys"} <= set(inspect(engine).get_table_names())


def test_lost_attempts_leave_no_scratch_behind(world) -> None:
    """A killed attempt's `work/<job>-<attempt>` is removed by the next attempt, and by the
    reaper once it gives the job up."""
    from service.storage import Storage

    settings, _, sessions, queue = world
    job_id = _job(sessions)
    tenant = _job_row(sessions, job_id).tenant_id
    store = Storage(settings.artifacts).tenant(tenant)
    lease = Lease.claim(sessions, Job, job_id, settings)
    store.work(f"{job_id}-{lease.attempt}").mkdir(parents=True)
    _expire(sessions, job_id)
    assert reap(sessions, settings, queue) == [job_id]
    assert store.work(f"{job_id}-1").is_dir()  # requeued: the next attempt clears it
    lease = Lease.claim(sessions, Job, job_id, settings)
    assert [path.name for path in store.clear_scratch(job_id)] == [f"{job_id}-1"]
    store.work(f"{job_id}-{lease.attempt}").mkdir(parents=True)
    other = store.work("job_other-1")
    other.mkdir()
    _expire(sessions, job_id)
    assert reap(sessions, settings, queue) == []
    assert _job_row(sessions, job_id).state == "failed"
    assert not store.work(f"{job_id}-2").exists() and other.is_dir()
