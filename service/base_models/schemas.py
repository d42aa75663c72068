"""Base models as the API takes and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.validation import RequestModel, Text


class BaseModelCreate(RequestModel):
    name: Text = Field(min_length=1, max_length=200)
    path: Text = Field(
        min_length=1,
        max_length=1024,
        description="absolute path of a Hugging Face model directory that workers can read",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="expected digest of the weights; registration fails if they differ",
    )


class BaseModelOut(BaseModel):
    id: str
    object: Literal["base_model"] = "base_model"
    name: str
    path: str
    digest: str = Field(description="sha256 over the safetensors files (name and content)")
    details: dict[str, Any]
    created_at: datetime
