"""Liveness, readiness (database and broker reachable) and Prometheus metrics.

Job and queue figures are read from the database and the broker at scrape time, so
every API replica reports the same numbers whichever worker did the work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from fudlr.states import TERMINAL, JobState, VersionState
from service.context import Context, ContextDep
from service.jobs.models import Job
from service.problems import Problem
from service.recommenders.models import Version

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)


# probes run their blocking checks on threads of their own (a few per event loop), so that
# a thread pool busy with requests never delays them
_PROBE_THREADS: RunVar[anyio.CapacityLimiter] = RunVar("fudlr_probe_threads")


def _probe_threads() -> anyio.CapacityLimiter:
    try:
        return _PROBE_THREADS.get()
    except LookupError:
        _PROBE_THREADS.set(limiter := anyio.CapacityLimiter(4))
        return limiter


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (in the event loop: no thread, no connection needed)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(context: ContextDep) -> dict[str, Any]:
    """Ready when the database and the broker both answer; 503 with what failed otherwise."""
    checks = {}
    for name, check in (("database", _database(context)), ("broker", context.queue.ping)):
        try:
            await anyio.to_thread.run_sync(check, limiter=_probe_threads())
            checks[name] = "ok"
        except Exception as error:
            checks[name] = f"unreachable: {type(error).__name__}"
    if any(value != "ok" for value in checks.values()):
        raise Problem(503, "not_ready", "a dependency is unreachable", checks=checks)
    return {"status": "ready", "checks": checks}


def _database(context: Context):
    def check() -> None:
        with context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return check


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class ServiceCollector(Collector):
    """Jobs and versions by state, finished jobs' durations, the queue's depth."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        with self.context.sessions() as session:
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            versions = dict(
                session.execute(select(Version.state, func.count()).group_by(Version.state)).all()
            )
            finished = session.execute(
                select(Job.state, Job.started_at, Job.finished_at).where(
                    Job.started_at.is_not(None), Job.finished_at.is_not(None)
                )
            ).all()
        yield _by_state("fudlr_jobs", "Jobs by state", tuple(JobState), jobs)
        yield _by_state("fudlr_versions", "Versions by index state", tuple(VersionState), versions)
        yield _durations(finished)
        depth = GaugeMetricFamily(
            "fudlr_queue_depth", "Task messages waiting in the broker", labels=["queue"]
        )
        try:
            depth.add_metric([self.context.settings.queue], self.context.queue.depth())
        except Exception as error:
            log.warning("queue depth unavailable: %s", error)
        yield depth


def _by_state(name: str, documentation: str, states: tuple[str, ...], counts: dict) -> Metric:
    gauge = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:
        gauge.add_metric([state], counts.get(state, 0))
    return gauge


def _durations(finished: list[Any]) -> Metric:
    family = HistogramMetricFamily(
        "fudlr_job_duration_seconds",
        "Wall time of finished jobs, first claim to end",
        labels=["state"],
    )
    for state in TERMINAL:
        seconds = [
            (row.finished_at - row.started_at).total_seconds()
            for row in finished
            if row.state == state
        ]
        buckets = [(str(bound), sum(s <= bound for s in seconds)) for bound in DURATION_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        family.add_metric([state], buckets, sum(seconds))
    return family
