"""JSON Lines reading and writing with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from fudlr.errors import InputError

RowT = TypeVar("RowT", bound=BaseModel)


def iter_rows(
    path: Path, schema: type[RowT], max_line_bytes: int | None = None
) -> Iterator[tuple[int, RowT]]:
    """Yield (line number, validated row); blank lines are skipped, anything else must parse.

    `max_line_bytes` bounds what one line may hold (an untrusted file could otherwise be a
    single line as large as itself, parsed in memory at several times its size)."""
    if not path.is_file():
        raise InputError("file not found", file=path)
    with path.open("rb") as handle:
        for line_number, text in enumerate(_lines(handle, max_line_bytes, path), start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"not valid JSON ({error.msg})", file=path, line=line_number
                ) from None
            except (ValueError, RecursionError) as error:  # too deep, or too many digits
                deep = isinstance(error, RecursionError)
                reason = "nested too deeply" if deep else "a number with too many digits"
                raise InputError(
                    f"not valid JSON ({reason})", file=path, line=line_number
                ) from None
            if not isinstance(raw, dict):
                raise InputError("expected a JSON object", file=path, line=line_number)
            try:
                yield line_number, schema.model_validate(raw)
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(part) for part in first["loc"]) or None
                raise InputError(first["msg"], file=path, line=line_number, field=field) from None


def _lines(handle: IO[bytes], limit: int | None, path: Path) -> Iterator[str]:
    """The file's lines as text, refusing one longer than `limit` bytes before reading it all."""
    number = 0
    while raw := handle.readline(-1 if limit is None else limit + 1):
        number += 1
        if limit is not None and len(raw) > limit and not raw.endswith(b"\n"):
            raise InputError(f"the line is longer than {limit} bytes", file=path, line=number)
        yield raw.decode("utf-8")


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
