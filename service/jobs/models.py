"""Debias jobs (the row is the source of truth for workers) and the events they emit."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, Session, mapped_column

from fudlr.states import JobState
from service.db import Base, Leased, utcnow


class Job(Leased, Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    PENDING: ClassVar[str] = JobState.QUEUED
    RUNNING: ClassVar[str] = JobState.RUNNING
    FAILED: ClassVar[str] = JobState.FAILED

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    recommender_id: Mapped[str] = mapped_column(ForeignKey("recommenders.id"), index=True)
    version: Mapped[int]
    spec: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
    report: Mapped[dict[str, Any] | None]
    result_version: Mapped[int | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    """A milestone of a job or an index: `id` increases, so `after=<id>` pages through them."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    subject_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float | None]


def add_event(session: Session, subject_id: str, kind: str, message: str, **fields: Any) -> None:
    """An event of a job or an index, in the caller's transaction: it commits with the change
    it records, or not at all."""
    session.add(Event(subject_id=subject_id, kind=kind, message=message, **fields))
