"""Uploaded files: data files (JSON Lines) and adapters; the bytes live in the artifact store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class File(Base):
    """`sha256`/`bytes` describe the upload; `details` what validation found (rows, adapter)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    @property
    def digest(self) -> str:
        """What the store keeps it under: an adapter's canonical archive (and folder), a
        data file's upload."""
        return self.details["digest"] if self.purpose == "adapter" else self.sha256
