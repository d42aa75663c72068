"""What every request handler needs, built once per process and injected as dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory
from service.settings import Settings
from service.storage import Storage
from workers.app import create_celery
from workers.queue import TaskQueue


@dataclass
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    queue: TaskQueue

    @classmethod
    def build(cls, settings: Settings) -> Context:
        engine = make_engine(settings.db_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            storage=Storage(settings.artifacts),
            queue=TaskQueue(create_celery(settings), settings.queue),
        )


def get_context(request: Request) -> Context:
    return request.app.state.context


def get_session(context: Annotated[Context, Depends(get_context)]) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


ContextDep = Annotated[Context, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
