"""JSON Lines reading and writing with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fudlr.errors import InputError

RowT = TypeVar("RowT", bound=BaseModel)


def iter_rows(path: Path, schema: type[RowT]) -> Iterator[tuple[int, RowT]]:
    """Yield (line number, validated row); blank lines are skipped, anything else must parse."""
    if not path.is_file():
        raise InputError("file not found", file=path)
    with path.open("r", encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"not valid JSON ({error.msg})", file=path, line=line_number
                ) from None
            if not isinstance(raw, dict):
                raise InputError("expected a JSON object", file=path, line=line_number)
            try:
                yield line_number, schema.model_validate(raw)
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(part) for part in first["loc"]) or None
                raise InputError(first["msg"], file=path, line=line_number, field=field) from None


def dump_line(row: BaseModel | dict[str, Any]) -> str:
    """One canonical JSON line: fixed key order, UTF-8 kept, so rebuilt files are byte-identical."""
    data = row.model_dump(mode="json") if isinstance(row, BaseModel) else row
    return json.dumps(data, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def write_rows(path: Path, rows: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write rows to a temporary file and rename it, so a crash never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    with temporary.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(dump_line(row))
            count += 1
    temporary.replace(path)
    return count
