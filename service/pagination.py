"""Cursor pagination, newest first: the cursor names the last row seen, so pages stay stable
while new rows arrive (an offset would shift)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from service.problems import Problem
from service.validation import ID_PATTERN

ItemT = TypeVar("ItemT")


class Page(BaseModel, Generic[ItemT]):
    data: list[ItemT]
    next_cursor: str | None = None


def encode_cursor(created_at: datetime, identifier: str) -> str:
    raw = json.dumps([created_at.isoformat(), identifier]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    """The cursor's (created_at, id), exactly as `encode_cursor` wrote them: an aware time
    that converts to UTC and an id's characters, else 422 (never a query that fails)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, identifier = json.loads(base64.urlsafe_b64decode(padded))
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None or not re.match(ID_PATTERN, identifier):
            raise ValueError
        return moment.astimezone(UTC), identifier
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise Problem(422, "validation_error", "invalid cursor", field="cursor") from None


def paginate(
    session: Session, query: Select[Any], model: Any, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    """Rows of `query` (already filtered by tenant) after `cursor`, and the next cursor."""
    if cursor:
        created, identifier = _decode(cursor)
        query = query.where(
            or_(
                model.created_at < created,
                and_(model.created_at == created, model.id < identifier),
            )
        )
    rows = session.scalars(
        query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    ).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)
