"""The FastAPI application: one router per resource, problems for every error, a reaper.

`create_app(settings)` builds everything from one Settings object; `uvicorn
service.app:create_app --factory` reads the environment.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry

from fudlr import __version__
from service import problems
from service.base_models.router import router as base_models
from service.context import Context
from service.db import migrate
from service.files.router import router as files
from service.health.router import ServiceCollector
from service.health.router import router as health
from service.jobs.router import router as jobs
from service.middleware import AuthBeforeBody, BodyLimit, RequestMetrics
from service.reaper import reap, settle_trash
from service.recommenders.router import router as recommenders
from service.settings import Settings
from service.usage.router import router as usage
from service.validation import known_query

log = logging.getLogger(__name__)
DESCRIPTION = (
    "Repair the fairness of a LoRA LLM recommender without retraining it: register a "
    "recommender, submit debias jobs, download the repaired adapter as a new version. "
    "Authenticate with `Authorization: Bearer <key>` (`fudlr keys create --tenant NAME`). "
    "Errors are `application/problem+json` with a stable `code`."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    context = Context.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # admitted requests take at most one thread at a time; the rest serve uploads'
        # spooling, metrics and probes
        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = max(threads.total_tokens, settings.max_concurrent_requests + 16)
        if settings.auto_migrate:
            await asyncio.to_thread(migrate, context.engine)
        await asyncio.to_thread(settle_trash, context.sessions, context.storage)
        # the ~170k objects of the imports (FastAPI, pydantic, SQLAlchemy, the method's
        # schemas) live as long as the process; frozen, a full collection no longer walks
        # them: under load those collections stopped every thread for 70-130 ms (the p99)
        gc.collect()
        gc.freeze()
        reaper = asyncio.create_task(_reap_forever(context))
        try:
            yield
        finally:
            reaper.cancel()
            context.engine.dispose()
            gc.unfreeze()  # a process that builds apps again (tests) frees their cycles

    app = FastAPI(
        title="FUDLR",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(known_query)],
    )
    app.state.context = context
    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(ServiceCollector(context))
    problems.install(app)
    app.add_middleware(BodyLimit, upload_limit=settings.max_upload_bytes)
    app.add_middleware(AuthBeforeBody, tenant_of=context.tenant_of)
    app.add_middleware(RequestMetrics, registry=app.state.metrics)
    for router in (files, base_models, recommenders, jobs, usage):
        app.include_router(router, responses=problems.RESPONSES)
    app.include_router(health)
    return app


async def _reap_forever(context: Context) -> None:
    """Take back work from lost workers, every `reaper_interval_seconds`, for the app's life."""
    while True:
        await asyncio.sleep(context.settings.reaper_interval_seconds)
        try:
            requeued = await asyncio.to_thread(
                reap, context.sessions, context.settings, context.queue
            )
            if requeued:
                log.info("reaper resent %s", ", ".join(requeued))
        except Exception:
            log.exception("reaper pass failed")
