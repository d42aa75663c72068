"""ASGI middleware: authentication and body caps before an upload is read, request metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import Problem, problem_response

_MULTIPART_SLACK = 64 << 10  # form fields and part headers around the file


class BodyLimit:
    """Refuse a request body over its cap (uploads: `upload_limit`, anything else: a JSON
    body's `limit`): at once from Content-Length, else while it streams in (a chunked or
    lying client), before the multipart parser spools it to disk."""

    def __init__(
        self,
        app: ASGIApp,
        upload_limit: int,
        limit: int = 1 << 20,
        upload_paths: tuple[str, ...] = ("/v1/files",),
    ) -> None:
        self.app, self.upload_paths = app, upload_paths
        self.upload_limit, self.limit = upload_limit + _MULTIPART_SLACK, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] in self.upload_paths else self.limit
        problem = Problem(413, "payload_too_large", f"the request body exceeds {limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_problem(problem, scope, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise problem
            return message

        await self.app(scope, limited, send)


class AuthBeforeBody:
    """Answer an upload with a missing or unknown key 401 before its body is read: FastAPI
    reads (and spools) a whole multipart body before it runs the dependency that would
    refuse the key, so an anonymous client could make the server take gigabytes."""

    def __init__(
        self,
        app: ASGIApp,
        tenant_of: Callable[[str], str | None],
        paths: tuple[str, ...] = ("/v1/files",),
    ) -> None:
        self.app, self.tenant_of, self.paths = app, tenant_of, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        known = scheme.lower() == "bearer" and key.strip() != ""
        if known:
            known = await anyio.to_thread.run_sync(self.tenant_of, key.strip()) is not None
        if not known:
            problem = Problem(
                401,
                "unauthorized",
                "missing, invalid or revoked API key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _send_problem(problem, scope, send)
            return
        await self.app(scope, receive, send)


async def _send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    response = problem_response(problem, Request(scope))
    response.headers["Connection"] = "close"
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class RequestMetrics:
    """Requests by method, route template and status, with their latency."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "fudlr_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "fudlr_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
