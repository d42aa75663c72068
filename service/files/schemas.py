"""Uploaded files as the API shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Purpose = Literal["adapter", "train", "valid", "test", "items", "users"]


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    purpose: Purpose
    filename: str
    bytes: int = Field(description="size of the upload")
    sha256: str = Field(description="sha256 of the upload")
    details: dict[str, Any] = Field(
        description="data files: rows; adapters: the archive digest, LoRA settings, files"
    )
    created_at: datetime
