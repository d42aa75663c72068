"""What every request handler needs, built once per process and injected as dependencies.

Handlers are synchronous: FastAPI runs each dependency and the handler as separate calls
into its thread pool, and the session's connection is held between them. If more
requests were in flight than the pool has connections, threads would block on the pool
while the requests holding connections wait for a thread: every request then waits out
the pool timeout. So a request is admitted (`admitted`) before it opens a session, at
most `max_concurrent_requests` at once, fewer than the pool's connections and the
thread pool's threads; the rest wait in the event loop, holding neither. The session and
the admission end when the handler's answer is built, before it is sent, so a slow
reader of a download holds no connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory
from service.problems import Problem
from service.queue import TaskQueue, create_celery
from service.settings import Settings
from service.storage import Storage


@dataclass
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    queue: TaskQueue
    admission: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.admission = asyncio.Semaphore(self.settings.max_concurrent_requests)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of an API key, on a short session of its own (before a request is
        admitted: it holds a connection only for the lookup)."""
        from service.auth.service import tenant_of

        with self.sessions() as session:
            return tenant_of(session, key)

    @classmethod
    def build(cls, settings: Settings) -> Context:
        engine = make_engine(
            settings.db_url,
            pool_size=settings.db_pool_size,
            max_overflow=0,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            storage=Storage(settings.artifacts),
            queue=TaskQueue(create_celery(settings), settings.queue),
        )


async def get_context(request: Request) -> Context:
    """Async: it only reads app state, and a sync dependency would cost every request a
    trip through the thread pool (a wait for a thread and for the GIL under load)."""
    return request.app.state.context


async def admitted(context: Annotated[Context, Depends(get_context)]) -> AsyncIterator[None]:
    """Wait for a turn (in the event loop, holding nothing); 503 if it takes too long."""
    try:
        await asyncio.wait_for(context.admission.acquire(), context.settings.request_queue_seconds)
    except TimeoutError:
        raise Problem(
            503,
            "overloaded",
            "the server is busy; retry shortly",
            headers={"Retry-After": "1"},
        ) from None
    try:
        yield
    finally:
        context.admission.release()


def get_session(
    context: Annotated[Context, Depends(get_context)],
    _: Annotated[None, Depends(admitted, scope="function")],
) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


ContextDep = Annotated[Context, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
