"""Adapter archives: unpacked without trusting a single header, packed byte-for-byte the same.

An upload is a `.tar.gz` (any tar compression) or a `.zip` of a PEFT directory. Every
entry is checked before anything is written: no absolute paths, no `..`, no links,
devices or FIFOs, no pickled weights, bounded entry count and unpacked size (counted
while reading, not taken from headers). A single top-level folder is stripped; the
result must be flat, as PEFT writes it.
"""

from __future__ import annotations

import gzip
import hashlib
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from service.problems import Problem

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
_JUNK = ("__MACOSX", ".DS_Store")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    members: int
    unpacked_bytes: int


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]
    is_dir: bool
    open: Callable[[], IO[bytes]]


def unpack(archive: Path, out: Path, limits: Limits) -> list[str]:
    """Unpack `archive` into the empty folder `out`; returns the file names written."""
    with _entries(archive, limits) as entries:
        files = [entry for entry in entries if not entry.is_dir]
        if not files:
            raise Problem(422, "invalid_archive", "the archive holds no files")
        roots = {entry.parts[0] for entry in files}
        strip = 1 if len(roots) == 1 and all(len(e.parts) > 1 for e in files) else 0
        budget = limits.unpacked_bytes
        names = []
        for entry in files:
            parts = entry.parts[strip:]
            if len(parts) != 1:
                raise Problem(
                    422,
                    "invalid_archive",
                    f"nested folders are not part of a PEFT adapter: '{'/'.join(entry.parts)}'",
                )
            if parts[0] in names:
                raise Problem(422, "invalid_archive", f"'{parts[0]}' appears twice")
            with entry.open() as source, (out / parts[0]).open("xb") as target:
                budget = _copy(source, target, budget, limits.unpacked_bytes)
            names.append(parts[0])
    return sorted(names)


def pack(folder: Path, out: Path) -> str:
    """A deterministic `.tar.gz` of a flat folder (sorted, no times or owners); its sha256."""
    with (
        out.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    hasher = hashlib.sha256()
    with out.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _copy(source: IO[bytes], target: IO[bytes], budget: int, limit: int) -> int:
    while chunk := source.read(_CHUNK):
        budget -= len(chunk)
        if budget < 0:
            raise Problem(
                413, "payload_too_large", f"the archive unpacks to more than {limit} bytes"
            )
        target.write(chunk)
    return budget


def _checked_parts(name: str) -> tuple[str, ...] | None:
    """The entry's path parts, None for junk to skip; unsafe paths are refused."""
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise Problem(422, "unsafe_archive", f"absolute path in the archive: '{name}'")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if ".." in parts:
        raise Problem(422, "unsafe_archive", f"'..' in an archive path: '{name}'")
    if not parts or parts[0] in _JUNK or parts[-1] in _JUNK or parts[-1].startswith("._"):
        return None
    if parts[-1].lower().endswith(PICKLED_SUFFIXES):
        raise Problem(
            422,
            "unsafe_weights",
            f"'{name}': pickled weights are refused; adapters must be safetensors only",
        )
    return parts


@contextmanager
def _entries(archive: Path, limits: Limits) -> Iterator[list[_Entry]]:
    with archive.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK\x03\x04") or magic.startswith(b"PK\x05\x06"):
        with zipfile.ZipFile(archive) as bundle:
            yield _zip_entries(bundle, limits)
        return
    try:
        with tarfile.open(archive, "r:*") as bundle:
            yield _tar_entries(bundle, limits)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise Problem(422, "invalid_archive", f"not a .tar.gz or .zip archive ({error})") from None


def _tar_entries(bundle: tarfile.TarFile, limits: Limits) -> list[_Entry]:
    entries = []
    while (member := bundle.next()) is not None:
        if len(entries) >= limits.members:
            raise Problem(422, "invalid_archive", f"more than {limits.members} archive entries")
        if member.issym() or member.islnk():
            raise Problem(422, "unsafe_archive", f"link in the archive: '{member.name}'")
        if not (member.isfile() or member.isdir()):
            raise Problem(
                422, "unsafe_archive", f"'{member.name}' is not a regular file or a folder"
            )
        parts = _checked_parts(member.name)
        if parts is not None:
            entries.append(_Entry(parts, member.isdir(), lambda m=member: _extracted(bundle, m)))
    return entries


def _extracted(bundle: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    handle = bundle.extractfile(member)
    if handle is None:  # only regular files reach here, which always extract
        raise Problem(422, "invalid_archive", f"cannot read '{member.name}'")
    return handle


def _zip_entries(bundle: zipfile.ZipFile, limits: Limits) -> list[_Entry]:
    infos = bundle.infolist()
    if len(infos) > limits.members:
        raise Problem(422, "invalid_archive", f"more than {limits.members} archive entries")
    entries = []
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool records no type
        if kind == stat.S_IFLNK:
            raise Problem(422, "unsafe_archive", f"link in the archive: '{info.filename}'")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise Problem(
                422, "unsafe_archive", f"'{info.filename}' is not a regular file or a folder"
            )
        if info.flag_bits & 0x1:
            raise Problem(422, "invalid_archive", f"'{info.filename}' is encrypted")
        parts = _checked_parts(info.filename)
        if parts is not None:
            entries.append(_Entry(parts, info.is_dir(), lambda i=info: bundle.open(i)))
    return entries
