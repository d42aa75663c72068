"""Content digests: base models, bundles and adapters are pinned by sha256, never by name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def files_sha256(root: Path, names: Iterable[str]) -> str:
    """One digest over several files of a directory, each prefixed by its name."""
    hasher = hashlib.sha256()
    for name in sorted(names):
        hasher.update(name.encode() + b"\0")
        hasher.update(file_sha256(root / name).encode())
    return hasher.hexdigest()
