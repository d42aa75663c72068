"""The artifact store: a folder shared by the API and every worker, one subtree per tenant.

    tenants/<tenant>/blobs/<aa>/<sha256>     data files and adapter archives, by content
    tenants/<tenant>/adapters/<digest>/      unpacked PEFT directories, by archive digest
    tenants/<tenant>/bundles/<digest>/       checked data bundles assembled from blobs (links)
    tenants/<tenant>/indexes/<version id>/   training-set index of one version
    tenants/<tenant>/measurements/<version id>/  a version's cached measurements (jobs reuse them)
    tenants/<tenant>/work/<id>-<attempt>/    a task's scratch space (removed by the next
                                             attempt, or by the reaper when it gives up)
    tenants/<tenant>/tmp/                    staging: everything is written here, then renamed
    tenants/<tenant>/trash/<subject>-<n>/    what a deletion moved aside until its database
                                             change committed (`removing`)

Content-addressed entries never change once renamed into place, so readers need no lock.
Writers that add or remove entries hold the tenant's lock (`Tenant.lock`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# what a tenant keeps, as counted against its quota (staging, scratch and trash are transient)
DURABLE = ("blobs", "adapters", "bundles", "indexes", "measurements")
_MANIFEST = "manifest.json"


def _checked(value: str, pattern: re.Pattern[str]) -> str:
    """Ids and digests become path parts: refuse anything that could leave the subtree."""
    if not pattern.match(value):
        raise ValueError(f"not a safe path component: {value!r}")
    return value


class Storage:
    """The whole store; `tenant()` hands out the only paths a request may touch."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tenant(self, tenant_id: str) -> TenantStore:
        return TenantStore(self.root / "tenants" / _checked(tenant_id, _SAFE_ID))

    def tenants_with_trash(self) -> list[str]:
        """Tenant ids whose trash holds something (an interrupted deletion, or one ending)."""
        return sorted(
            trash.parent.name
            for trash in (self.root / "tenants").glob("*/trash")
            if any(trash.iterdir())
        )


class TenantStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, sha256: str) -> Path:
        digest = _checked(sha256, _SHA256)
        return self.root / "blobs" / digest[:2] / digest

    def adapter(self, digest: str) -> Path:
        return self.root / "adapters" / _checked(digest, _SHA256)

    def content(self, digest: str) -> list[Path]:
        """Everything kept under a digest: the blob, and an adapter's unpacked folder."""
        return [self.blob(digest), self.adapter(digest)]

    def bundle(self, digest: str) -> Path:
        return self.root / "bundles" / _checked(digest, _SHA256)

    def index(self, version_id: str) -> Path:
        return self.root / "indexes" / _checked(version_id, _SAFE_ID)

    def measurements(self, version_id: str) -> Path:
        return self.root / "measurements" / _checked(version_id, _SAFE_ID)

    def work(self, name: str) -> Path:
        return self.root / "work" / _checked(name, _SAFE_ID)

    def clear_scratch(self, subject_id: str) -> list[Path]:
        """Remove what attempts at a task left behind (a killed worker cleans nothing):
        `work/<id>-<attempt>` folders and an index's unfinished `<id>.partial`."""
        subject = _checked(subject_id, _SAFE_ID)
        leftovers = [*(self.root / "work").glob(f"{subject}-*")]
        leftovers += [self.root / "indexes" / f"{subject}.partial"]
        removed = [path for path in leftovers if path.exists()]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder on the store's file system (so renames are atomic), always removed."""
        path = self.root / "tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def bytes_stored(self) -> int:
        """What the tenant keeps, in bytes (a file linked into a bundle counts once)."""
        return size_of(self.root / top for top in DURABLE)

    @contextmanager
    def removing(self, subject_id: str, paths: Iterable[Path]) -> Iterator[None]:
        """Move `paths` aside into a fresh trash folder, run the block (the database change
        that forgets them), then remove them; if the block raises an error, move them back.

        The folder's manifest is written before anything moves, so a crash at any point
        leaves a folder `recover_trash` can settle from the database: still there, the
        subject gets its files back; gone, the files go too. Hold the tenant's lock."""
        folder = self.root / "trash" / f"{_checked(subject_id, _SAFE_ID)}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        moved = [str(path.relative_to(self.root)) for path in dict.fromkeys(paths)]
        manifest = folder / f"{_MANIFEST}.partial"
        manifest.write_text(json.dumps({"subject": subject_id, "moved": moved}))
        manifest.rename(folder / _MANIFEST)
        try:
            for position, original in enumerate(moved):
                if os.path.lexists(self.root / original):
                    (self.root / original).rename(folder / str(position))
            yield
        except Exception:  # an interruption (signal, exit) is left to recover_trash
            self._restore(folder)
            raise
        shutil.rmtree(folder, ignore_errors=True)

    def recover_trash(self, exists: Callable[[str], bool]) -> list[str]:
        """Settle what interrupted deletions left in the trash: a subject that `exists` in
        the database gets its files back, another one's are removed. Hold the tenant's lock.
        Returns the subjects settled."""
        settled = []
        for folder in sorted((self.root / "trash").glob("*")):
            try:
                subject = json.loads((folder / _MANIFEST).read_text())["subject"]
            except (OSError, ValueError, KeyError, TypeError):
                subject = None  # the manifest was never written: nothing was moved
            if subject is not None and exists(subject):
                self._restore(folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
            settled.append(subject or folder.name)
        return settled

    def _restore(self, folder: Path) -> None:
        """Move a trash folder's entries back where they came from, then drop the folder.
        An entry whose place is taken again is the same content (content-addressed)."""
        moved = json.loads((folder / _MANIFEST).read_text())["moved"]
        for position, original in enumerate(moved):
            entry, target = folder / str(position), self.root / original
            if os.path.lexists(entry) and not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                entry.rename(target)
        shutil.rmtree(folder, ignore_errors=True)

    def put(self, source: Path, target: Path) -> Path:
        """Rename `source` (a file or a folder) to the content-addressed `target`; if the same
        content is already there, keep that one."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            return target
        try:
            source.rename(target)
        except OSError:
            if not target.exists():  # a concurrent writer may have won the rename
                raise
        return target

    def assemble_bundle(self, files: Mapping[str, str], folder: Path) -> str:
        """Link `{file name: blob sha256}` into the new `folder`; the bundle's digest (over
        names and contents), under which `put` stores it once it has been checked."""
        hasher = hashlib.sha256()
        folder.mkdir()
        for name in sorted(files):
            hasher.update(f"{name}\0{files[name]}\0".encode())
            _link_or_copy(self.blob(files[name]), folder / name)
        return hasher.hexdigest()


def size_of(paths: Iterable[Path]) -> int:
    """Bytes of the files under `paths` (files or folders), each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in paths:
        walked = os.walk(path) if path.is_dir() else [(path.parent, [], [path.name])]
        for folder, _, names in walked:
            for name in names:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:  # removed meanwhile
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
    return total


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
