"""Read a safetensors header (names, dtypes, shapes) without torch and without the data.

The API checks uploaded adapters and matches them against base models in the request
path, where loading tensors would be slow and torch is not imported.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fudlr.errors import InputError

_MAX_HEADER = 100 << 20


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)}; InputError when the file is not valid safetensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError("not a safetensors file (too short)", file=path)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise InputError("not a safetensors file (bad header length)", file=path)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("not a safetensors file (header is not JSON)", file=path) from None
    if not isinstance(header, dict):
        raise InputError("not a safetensors file (header is not an object)", file=path)
    tensors = {}
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            start, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"tensor '{name}' has a malformed header entry", file=path) from None
        if not 0 <= start <= end <= data_size:
            raise InputError(f"tensor '{name}' points outside the file", file=path)
        tensors[name] = (dtype, shape)
    return tensors
