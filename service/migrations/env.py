"""Alembic environment: `service.db.migrate` hands in a connection; `alembic` CLI uses the URL."""

from __future__ import annotations

from alembic import context

from service.db import make_engine
from service.models import Base
from service.settings import Settings


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    with make_engine(Settings().db_url).begin() as fresh:
        _run(fresh)
