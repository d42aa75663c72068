"""Row schemas of the data bundle (docs/method.md, "The data bundle"), shared by the
loader and the upload check."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ItemRow(_Row):
    """One catalog item; `attributes` holds groupable fields such as genres or popularity_group."""

    item_id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    attributes: dict[str, Any] = Field(default_factory=dict)


class UserRow(_Row):
    """One user; `attributes` holds groupable fields such as gender or age."""

    user_id: str = Field(min_length=1)
    attributes: dict[str, Any] = Field(default_factory=dict)


class SampleRow(_Row):
    """One training/evaluation sample: the exact texts the LLM saw, never regenerated."""

    sample_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    history: list[str]
    target: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)

    @field_validator("history")
    @classmethod
    def _history_ids_not_empty(cls, history: list[str]) -> list[str]:
        if any(not item_id for item_id in history):
            raise ValueError("history holds an empty item id")
        return history


SPLITS = ("train", "valid", "test")
ROW_SCHEMAS: dict[str, type[_Row]] = {
    "items": ItemRow,
    "users": UserRow,
    "train": SampleRow,
    "valid": SampleRow,
    "test": SampleRow,
}
