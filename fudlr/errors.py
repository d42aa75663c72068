"""One error type for every bad input the method refuses, so callers can show it as one line."""

from __future__ import annotations

from pathlib import Path


class FudlrError(Exception):
    """A user-facing error: the message alone says what was wrong and where."""


class InputError(FudlrError):
    """Bad input data, located at a file, a line and (where known) a field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = ":".join(part for part in (self.file, str(line) if line else None) if part)
        prefix = f"{where}: " if where else ""
        field_part = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{field_part}{message}")
