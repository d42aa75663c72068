"""Tenants and their API keys; a key is kept only as its sha256, never in clear."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.db import Base, utcnow


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @staticmethod
    def lock(session: Session, tenant_id: str) -> None:
        """Hold the tenant's lock until `session` commits or rolls back: whatever adds or
        removes artifacts, or checks a quota, takes it, so that a deletion never removes what
        a concurrent request is about to reference, and two uploads never both fit the last
        bytes of a quota. A no-op UPDATE of the row: PostgreSQL locks the row (FK checks of
        other inserts do not wait for it), SQLite the database, in every API process and
        worker alike."""
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
