"""Run `fudlr serve` (embedded: SQLite, local artifacts, filesystem broker, one worker) as a
child process, for scripts that drive the service end to end (the demo, the benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from fudlr.errors import FudlrError

ROOT = Path(__file__).resolve().parent.parent
FUDLR = [sys.executable, "-m", "clients.cli"]


@contextmanager
def embedded_service(
    data_dir: Path,
    port: int,
    log: Path,
    ready_timeout: float = 120.0,
    model_roots: Sequence[Path] | None = None,
) -> Iterator[dict[str, str]]:
    """Start the service with its state under `data_dir` and its output in `log`; yields the
    environment its clients need (FUDLR_URL, FUDLR_DATA_DIR for `fudlr keys`); stops it after.

    Base models may be registered from `model_roots`; by default from the folder that holds
    `data_dir` (a script keeps its models beside the service's state) unless
    FUDLR_MODEL_ROOTS says otherwise."""
    env = {**os.environ, "FUDLR_DATA_DIR": str(data_dir), "FUDLR_URL": f"http://127.0.0.1:{port}"}
    if model_roots is not None or "FUDLR_MODEL_ROOTS" not in env:
        roots = model_roots if model_roots is not None else [data_dir.parent]
        env["FUDLR_MODEL_ROOTS"] = json.dumps([str(Path(root).resolve()) for root in roots])
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as output:
        server = subprocess.Popen(
            [*FUDLR, "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(env["FUDLR_URL"]):
            if server.poll() is not None:
                raise FudlrError(f"fudlr serve exited with {server.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise FudlrError(f"fudlr serve was not ready after {ready_timeout:g}s; see {log}")
            time.sleep(1)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def create_key(env: dict[str, str], tenant: str) -> str:
    """A new API key for `tenant` in the service's database (`fudlr keys create`)."""
    result = subprocess.run(
        [*FUDLR, "keys", "create", "--tenant", tenant],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
