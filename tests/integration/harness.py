"""Real servers for the service tests: throwaway PostgreSQL databases, Redis, a uvicorn server,
`fudlr` processes (API, workers) that can be killed, and polling with a deadline."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.settings import Settings

PG_ADMIN_URL = os.environ.get("FUDLR_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FUDLR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    check: Callable[[], T | None], timeout: float = 240.0, interval: float = 0.2, what: str = ""
) -> T:
    """The first truthy value of `check()`, or a failed test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or check}")
        time.sleep(interval)


@contextmanager
def throwaway_database(admin: str = PG_ADMIN_URL) -> Iterator[str]:
    """A fresh PostgreSQL database on the server of `admin` for one test session (or one
    benchmark), dropped afterwards; skips the test when the server is unreachable."""
    import psycopg

    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL unreachable at {admin}: {error}")
    name = f"fudlr_test_{secrets.token_hex(4)}"
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin.rsplit("/", 1)[0] + f"/{name}"
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_redis(url: str = REDIS_URL) -> str:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis unreachable at {url}: {error}")
    return url


def service_env(settings: dict[str, Any], cache: Path) -> dict[str, str]:
    """Environment of a `fudlr` process: FUDLR_* settings, the method's cache, one thread."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FUDLR_")}
    env.update({f"FUDLR_{key.upper()}": str(value) for key, value in settings.items()})
    env.update(FUDLR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class FudlrProcess:
    """A `fudlr ...` command in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a prefork worker and the child running the task)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class InProcessServer:
    """The API under a real uvicorn server on a free port, in a thread of the test process
    (so tests can reach its database through `context`)."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from service.app import create_app

        self.app = create_app(settings)
        self.context = self.app.state.context
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessServer:
        self.app.openapi()  # built once, seconds on a busy machine: not in a test's timeout
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def api_key(settings: Settings, tenant: str) -> str:
    """A key for `tenant`, made the way `fudlr keys create` makes one."""
    from service.auth.service import create_key
    from service.db import make_engine, migrate, session_factory, transaction

    engine = make_engine(settings.db_url)
    migrate(engine)
    with transaction(session_factory(engine)) as session:
        key = create_key(session, tenant)[2]
    engine.dispose()
    return key
