"""The artifact store: a folder shared by the API and every worker, one subtree per tenant.

    tenants/<tenant>/blobs/<aa>/<sha256>     data files and adapter archives, by content
    tenants/<tenant>/adapters/<digest>/      unpacked PEFT directories, by archive digest
    tenants/<tenant>/bundles/<digest>/       checked data bundles assembled from blobs (links)
    tenants/<tenant>/indexes/<version id>/   training-set index of one version
    tenants/<tenant>/work/<id>-<attempt>/    a task's scratch space (removed by the next
                                             attempt, or by the reaper when it gives up)
    tenants/<tenant>/tmp/                    staging: everything is written here, then renamed

Content-addressed entries never change once renamed into place, so readers need no lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


class TenantStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, sha256: str) -> Path:
        digest = _checked(sha256, _SHA256)
        return self.root / "blobs" / digest[:2] / digest

    def adapter(self, digest: str) -> Path:
        return self.root / "adapters" / _checked(digest, _SHA256)

    def bundle(self, digest: str) -> Path:
        return self.root / "bundles" / _checked(digest, _SHA256)

    def index(self, version_id: str) -> Path:
        return self.root / "indexes" / _checked(version_id, _SAFE_ID)

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


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
