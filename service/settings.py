"""Every knob of the API and the workers, read from `FUDLR_*` environment variables.

One Settings object is built per process and handed down (FastAPI dependencies, the
worker runtime), so tests configure a server or a worker by constructing one.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fudlr.paths import model_store


def _default_data_dir() -> Path:
    """`$XDG_DATA_HOME/fudlr` (else ~/.local/share/fudlr): service state is not a cache."""
    base = os.environ.get("XDG_DATA_HOME")
    return (Path(base) if base else Path.home() / ".local" / "share") / "fudlr"


class Settings(BaseSettings):
    """Embedded defaults (SQLite, a local artifact folder, a filesystem broker) unless set.

    data_dir: root of the embedded defaults. database_url: SQLAlchemy URL (sqlite:///...,
    postgresql://...). broker_url: Celery broker (redis://..., filesystem://).
    artifact_dir: adapters, data files, indexes (shared by the API and every worker).
    model_roots: base models may only be registered below these directories (default: the
    data directory's `models/` folder and the method's model store, FUDLR_MODEL_STORE).
    lease_seconds: a running task's lease; a worker renews it every heartbeat_seconds, and
    the reaper requeues (or fails, after max_attempts) work whose lease expired.
    visibility_timeout_seconds: Redis redelivers an unacknowledged task after this long;
    it must exceed the longest job (the database, not the broker, decides reruns).
    """

    model_config = SettingsConfigDict(env_prefix="FUDLR_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    model_roots: list[Path] = Field(default_factory=list)

    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest file a client may upload")
    max_extracted_bytes: int = Field(
        1 << 30,
        gt=0,
        description="largest size an adapter archive may unpack to, every entry counted "
        "(a LoRA adapter's weights are well below it)",
    )
    max_archive_members: int = Field(
        64, gt=0, description="most entries an adapter archive may hold"
    )
    max_line_bytes: int = Field(
        1 << 20, gt=0, description="longest line a JSON Lines data file may have"
    )

    max_tenant_bytes: int = Field(
        50 << 30,
        gt=0,
        description="bytes a tenant may store (uploaded files, adapter versions, indexes); "
        "an upload beyond it, or new work once it is reached, answers 413 quota_exceeded",
    )
    max_tenant_jobs: int = Field(
        4,
        ge=1,
        description="debias jobs a tenant may have queued or running at once; one more "
        "answers 429 quota_exceeded",
    )
    quota_retry_after_seconds: int = Field(
        60, ge=1, description="the Retry-After of a 429 quota_exceeded"
    )

    db_pool_size: int = Field(
        24,
        ge=2,
        description="database connections each API process keeps open; requests in flight "
        "are capped below it, so a request never waits for a connection",
    )
    db_pool_timeout_seconds: float = Field(
        10.0, gt=0, description="longest wait for a pooled connection before an error"
    )
    max_concurrent_requests: int = Field(
        16,
        ge=1,
        description="API requests handled at once; more wait their turn in the event loop, "
        "holding no thread and no connection (at most db_pool_size - 4: the rest is kept "
        "for probes, metrics, the reaper and task sends)",
    )
    request_queue_seconds: float = Field(
        10.0,
        gt=0,
        description="a request that waited this long for its turn answers 503 (Retry-After)",
    )

    queue: str = "gpu"
    device: str = "auto"
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="how much a worker lowers its CPU priority (os.nice) before it takes "
        "tasks: a job's training and decoding use every core, and on a machine it shares "
        "with the API (embedded `fudlr serve`) requests and probes must come first; 0 keeps "
        "the inherited priority",
    )
    lease_seconds: float = Field(120.0, gt=0)
    heartbeat_seconds: float | None = Field(None, gt=0)
    cancel_poll_seconds: float = Field(1.0, ge=0)
    max_attempts: int = Field(3, ge=1)
    reaper_interval_seconds: float = Field(10.0, gt=0)
    visibility_timeout_seconds: int = Field(24 * 3600, gt=0)
    auto_migrate: bool = True

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        return self

    @model_validator(mode="after")
    def _requests_within_pool(self) -> Settings:
        """Every admitted request must find a connection, or threads wait on the pool."""
        if self.max_concurrent_requests > self.db_pool_size - 4:
            raise ValueError("max_concurrent_requests must be at most db_pool_size - 4")
        return self

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fudlr.db'}"

    @cached_property
    def roots(self) -> list[Path]:
        """Where base models may be registered from: `model_roots`, else the defaults."""
        if self.model_roots:
            return list(self.model_roots)
        return [self.data_dir / "models", model_store()]

    @cached_property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @cached_property
    def artifacts(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @cached_property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (embedded mode only)."""
        return self.data_dir / "broker"

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3
