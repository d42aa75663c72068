"""What every value from a client must be before it reaches the database or the disk.

Both backends refuse some values a JSON parser accepts: integers beyond their column
types (PostgreSQL's INTEGER is 32-bit, SQLite's 64-bit), NUL characters and lone UTF-16
surrogates in text (PostgreSQL cannot store them, neither encodes to UTF-8), and
`Infinity`/`NaN` (not JSON; SQLite would store them as such). They are refused here, at
the boundary, with a validation error naming the field, instead of failing in a driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Path, Query, Request
from fastapi.dependencies.models import Dependant
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.problems import Problem

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Ids are `prefix_hex`; anything else cannot name an object, so it is refused before a query.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Id = Annotated[str, Field(pattern=ID_PATTERN, description="an object id, e.g. `job_…`")]
IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="an object id")]
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="an object id")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description="`next_cursor` of a page"),
]
VersionNumber = Annotated[int, Path(ge=1, le=INT32_MAX, description="a version number")]


def unsafe_text(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None."""
    if "\x00" in value:
        return "NUL characters are not allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "lone UTF-16 surrogates are not allowed"
    return None


def _storable(value: str) -> str:
    reason = unsafe_text(value)
    if reason is not None:
        raise ValueError(reason)
    return value


Text = Annotated[str, AfterValidator(_storable)]


class RequestModel(BaseModel):
    """Base of every request body: unknown fields and non-finite numbers are refused (text
    fields are `Text` or `Id`, integers compared in queries `Int32`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


_DECLARED: dict[int, frozenset[str]] = {}


async def known_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: a misspelt `limt=5` would
    otherwise be ignored silently and the client would never learn why."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    declared = _DECLARED.get(id(route))
    if declared is None:
        declared = _DECLARED[id(route)] = frozenset(_query_names(route.dependant))
    for name in request.query_params:
        if name not in declared:
            raise Problem(
                422,
                "validation_error",
                f"unknown query parameter '{name[:64]}'",
                field=name[:64],
            )


def _query_names(dependant: Dependant) -> Iterator[str]:
    for param in dependant.query_params:
        yield param.alias
    for child in dependant.dependencies:
        yield from _query_names(child)
