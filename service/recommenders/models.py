"""Recommenders (base model + adapter + the exact training data) and their adapter versions.

Version 1 is the registered adapter; every succeeded job adds the next. Each version
carries its own training-set index, built by a leased worker task (state `indexing`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fudlr.states import VersionState
from service.db import Base, Leased, utcnow


class Recommender(Base):
    __tablename__ = "recommenders"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    adapter_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    data: Mapped[dict[str, Any]]
    bundle_digest: Mapped[str] = mapped_column(String(64))
    index_options: Mapped[dict[str, Any]]
    # how jobs decode its lists unless they say otherwise (a Decoding value)
    decoding: Mapped[str] = mapped_column(String(16), default="constrained")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Version(Leased, Base):
    """`digest` is the sha256 of the adapter archive served for download (its ETag)."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("recommender_id", "number"),)

    PENDING: ClassVar[str] = VersionState.INDEXING
    RUNNING: ClassVar[str] = VersionState.INDEXING
    FAILED: ClassVar[str] = VersionState.FAILED

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    recommender_id: Mapped[str] = mapped_column(ForeignKey("recommenders.id"), index=True)
    number: Mapped[int]
    parent_number: Mapped[int | None]
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    digest: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
