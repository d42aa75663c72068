"""A tenant's usage against its quotas, as the API shows it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class UsageOut(BaseModel):
    object: Literal["usage"] = "usage"
    bytes_stored: int = Field(description="uploaded files, adapter versions, indexes, in bytes")
    max_bytes: int = Field(description="the byte quota (FUDLR_MAX_TENANT_BYTES)")
    active_jobs: int = Field(description="debias jobs queued, running or cancelling")
    max_jobs: int = Field(description="the concurrent job quota (FUDLR_MAX_TENANT_JOBS)")
