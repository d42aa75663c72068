"""The two tasks. Each is a thin call into the Runtime of the worker process's app."""

from __future__ import annotations

from celery import Task, shared_task

from service.queue import INDEX_TASK, JOB_TASK
from workers.runner import Runtime


def _runtime(task: Task) -> Runtime:
    """One Runtime per process, built on first use from the app's Settings."""
    app = task.app
    runtime = getattr(app, "fudlr_runtime", None)
    if runtime is None:
        runtime = app.fudlr_runtime = Runtime(app.fudlr_settings, app)
    return runtime


@shared_task(bind=True, name=INDEX_TASK)
def index_version(self: Task, version_id: str) -> None:
    """Build the training-set index of one recommender version."""
    _runtime(self).index_version(version_id)


@shared_task(bind=True, name=JOB_TASK)
def run_job(self: Task, job_id: str) -> None:
    """Run one debias job and publish the repaired adapter as the next version."""
    _runtime(self).run_job(job_id)
