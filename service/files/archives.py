"""Adapter archives: unpacked without trusting a single header, packed byte-for-byte the same.

An upload is a `.tar.gz` (any tar compression) or a `.zip` of a PEFT directory. Every
entry is checked before anything is written: no absolute paths, no `..`, no links,
devices or FIFOs, no pickled weights, bounded entry count, name length and unpacked size.
Every entry's bytes count against the size limit, those skipped included (a tar must be
decompressed through them; a zip's are counted as declared), and the kept files' as read,
not as their headers claim. Only what the product needs is kept: the adapter's config and
its safetensors weights; anything else (a README, junk of the archiving tool, names that
are odd but harmless) is skipped. A single top-level folder is stripped; the kept files
must sit at the top, as PEFT writes them. A corrupt archive is an `invalid_archive`.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from service.problems import Problem

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
KEPT = ("adapter_config.json", "adapter_model.safetensors")
_CHUNK = 1 << 20
_MAX_NAME = 255  # bytes of one path component: what common file systems allow
# what a damaged or unsupported archive raises while it is listed or read
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # a zip compression method Python does not read
    zlib.error,
    lzma.LZMAError,
    EOFError,
    tarfile.TarError,
    gzip.BadGzipFile,
)


@dataclass(frozen=True)
class Limits:
    members: int
    unpacked_bytes: int


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]
    is_dir: bool
    open: Callable[[], IO[bytes]]


class _Budget:
    """Unpacked bytes left; refuses the archive as soon as they run out."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise Problem(
                413, "payload_too_large", f"the archive unpacks to more than {self.limit} bytes"
            )


def unpack(archive: Path, out: Path, limits: Limits) -> list[str]:
    """Unpack the adapter's files of `archive` into the empty folder `out`; their names."""
    budget = _Budget(limits.unpacked_bytes)
    try:
        with _entries(archive, limits, budget) as entries:
            return _unpack(entries, out, budget)
    except _CORRUPT as error:
        raise Problem(
            422, "invalid_archive", f"a damaged or unsupported archive ({type(error).__name__})"
        ) from None


def _unpack(entries: list[_Entry], out: Path, budget: _Budget) -> list[str]:
    files = [entry for entry in entries if not entry.is_dir]
    if not files:
        raise Problem(422, "invalid_archive", "the archive holds no files")
    roots = {entry.parts[0] for entry in files}
    strip = 1 if len(roots) == 1 and all(len(e.parts) > 1 for e in files) else 0
    names: list[str] = []
    for entry in files:
        parts = entry.parts[strip:]
        if parts[-1] not in KEPT:
            continue
        if len(parts) != 1:
            raise Problem(
                422,
                "invalid_archive",
                f"'{_shown('/'.join(entry.parts))}' is in a folder; a PEFT adapter is flat",
            )
        if parts[0] in names:
            raise Problem(422, "invalid_archive", f"'{parts[0]}' appears twice")
        with entry.open() as source, (out / parts[0]).open("xb") as target:
            while chunk := source.read(_CHUNK):
                budget.spend(len(chunk))
                target.write(chunk)
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


def _shown(name: str, width: int = 80) -> str:
    """An entry's name as an error shows it: printable, and short."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in name)
    return printable if len(printable) <= width else printable[: width - 1] + "…"


def _checked_parts(name: str) -> tuple[str, ...] | None:
    """The entry's path parts (backslashes read as separators), None for an entry that is
    only folders; absolute paths, `..`, over-long names and pickled weights are refused."""
    posix = name.replace("\\", "/")
    if posix.startswith("/"):
        raise Problem(422, "unsafe_archive", f"absolute path in the archive: '{_shown(name)}'")
    parts = tuple(part for part in PurePosixPath(posix).parts if part not in ("", "."))
    if ".." in parts:
        raise Problem(422, "unsafe_archive", f"'..' in an archive path: '{_shown(name)}'")
    if any(len(part.encode("utf-8", "surrogateescape")) > _MAX_NAME for part in parts):
        raise Problem(
            422,
            "invalid_archive",
            f"an entry's name is longer than {_MAX_NAME} bytes: '{_shown(name)}'",
        )
    if not parts:
        return None
    if parts[-1].lower().endswith(PICKLED_SUFFIXES):
        raise Problem(
            422,
            "unsafe_weights",
            f"'{_shown(name)}': pickled weights are refused; adapters must be safetensors only",
        )
    return parts


@contextmanager
def _entries(archive: Path, limits: Limits, budget: _Budget) -> Iterator[list[_Entry]]:
    with archive.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK\x03\x04") or magic.startswith(b"PK\x05\x06"):
        with zipfile.ZipFile(archive) as bundle:
            yield _zip_entries(bundle, limits, budget)
        return
    with _open_tar(archive) as bundle:
        yield _tar_entries(bundle, limits, budget)


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, OSError):
        raise Problem(422, "invalid_archive", "not a .tar.gz or .zip archive") from None


def _tar_entries(bundle: tarfile.TarFile, limits: Limits, budget: _Budget) -> list[_Entry]:
    """Members as listed, each one's declared size spent before the next is read: skipping
    over a member decompresses it, so a bomb is refused before it costs its size."""
    entries: list[_Entry] = []
    members = kept = 0
    while (member := bundle.next()) is not None:
        members += 1
        if members > limits.members:
            raise Problem(422, "invalid_archive", f"more than {limits.members} archive entries")
        if member.issym() or member.islnk():
            raise Problem(422, "unsafe_archive", f"link in the archive: '{_shown(member.name)}'")
        if not (member.isfile() or member.isdir()):
            raise Problem(
                422, "unsafe_archive", f"'{_shown(member.name)}' is not a regular file or a folder"
            )
        parts = _checked_parts(member.name)
        if member.isfile():
            budget.spend(member.size)
            kept += member.size if parts is not None and parts[-1] in KEPT else 0
        if parts is not None:
            entries.append(_Entry(parts, member.isdir(), lambda m=member: _extracted(bundle, m)))
    budget.left += kept  # kept files are counted as they are read
    return entries


def _extracted(bundle: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    handle = bundle.extractfile(member)
    if handle is None:  # only regular files reach here, which always extract
        raise Problem(422, "invalid_archive", f"cannot read '{_shown(member.name)}'")
    return handle


def _zip_entries(bundle: zipfile.ZipFile, limits: Limits, budget: _Budget) -> list[_Entry]:
    """Entries of the central directory; skipped ones count as declared (never read), kept
    ones as read."""
    infos = bundle.infolist()
    if len(infos) > limits.members:
        raise Problem(422, "invalid_archive", f"more than {limits.members} archive entries")
    entries = []
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool records no type
        if kind == stat.S_IFLNK:
            raise Problem(422, "unsafe_archive", f"link in the archive: '{_shown(info.filename)}'")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise Problem(
                422,
                "unsafe_archive",
                f"'{_shown(info.filename)}' is not a regular file or a folder",
            )
        if info.flag_bits & 0x1:
            raise Problem(422, "invalid_archive", f"'{_shown(info.filename)}' is encrypted")
        parts = _checked_parts(info.filename)
        if parts is not None and parts[-1] not in KEPT:
            budget.spend(info.file_size)
        if parts is not None:
            entries.append(_Entry(parts, info.is_dir(), lambda i=info: bundle.open(i)))
    return entries
