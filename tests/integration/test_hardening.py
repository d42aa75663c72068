"""A service that holds under load and hostile input: concurrency beyond the database pool,
values the database cannot store, archives and data files that cost more than they say,
and answers that must not reveal the server's files."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import httpx
import pytest

from bench.load import seed_job
from service.settings import Settings
from tests.integration.harness import InProcessServer, api_key


@pytest.fixture
def small_pool(tmp_path: Path, database_url: str):
    """A server whose pool is far smaller than the thread pool and the clients."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        db_pool_size=6,
        max_concurrent_requests=2,
        request_queue_seconds=55,  # a slow machine: this test is about deadlocks, not speed
        reaper_interval_seconds=3600,
    )
    key = api_key(settings, "load")
    job = seed_job(settings.db_url, "load")
    with InProcessServer(settings) as server:
        yield server, key, job


def test_many_pollers_on_a_small_pool_are_all_answered(small_pool) -> None:
    """More requests in flight than connections once deadlocked every request until the
    pool's timeout; now they wait their turn and /healthz answers meanwhile."""
    server, key, job = small_pool

    async def run() -> tuple[list[int], float]:
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

            async def poll() -> int:
                return (await client.get(f"/v1/jobs/{job}", headers=headers)).status_code

            polls = [asyncio.create_task(poll()) for _ in range(120)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            health = await client.get("/healthz")
            waited = time.monotonic() - started
            assert health.status_code == 200
            return list(await asyncio.gather(*polls)), waited

    statuses, health_seconds = asyncio.run(asyncio.wait_for(run(), 60))
    assert statuses == [200] * len(statuses)
    assert health_seconds < 5


@pytest.fixture
def served(tmp_path: Path, database_url: str):
    settings = Settings(data_dir=tmp_path, database_url=database_url, reaper_interval_seconds=3600)
    key = api_key(settings, "edge")
    job = seed_job(settings.db_url, "edge")
    with InProcessServer(settings) as server:
        client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        yield server, client, job
        client.close()


def _cursor(created: str, identifier: str = "job_x") -> str:
    raw = json.dumps([created, identifier]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BIAS = {"side": "item", "attribute": "popularity_group", "metric": "MGU", "k": 5}


def test_values_the_database_cannot_store_are_refused_where_they_are(served) -> None:
    """Integers beyond the column types, NUL and lone surrogates, non-finite numbers and
    cursors that cannot be compared: each a 422 naming the field, never a 500."""
    server, client, job = served
    body = {"recommender_id": "rec_x", "biases": [BIAS]}
    cases = [
        ("GET", f"/v1/jobs/{job}/events", {"params": {"after": 2**63}}, "after"),
        ("GET", "/v1/recommenders/rec_x/versions", {"params": {"after": 2**31}}, "after"),
        ("GET", f"/v1/recommenders/rec_x/versions/{2**31}", {}, "number"),
        ("GET", f"/v1/recommenders/rec_x/versions/{2**31}/adapter", {}, "number"),
        ("POST", "/v1/jobs", {"json": {**body, "version": 2**31}}, "version"),
        ("POST", "/v1/jobs", {"json": {**body, "options": {"seed": 2**63}}}, "options.seed"),
        ("GET", "/v1/jobs/job%00x", {}, "job_id"),
        ("GET", "/v1/files/%ED%A0%80", {}, "file_id"),
        ("GET", "/v1/jobs", {"params": {"recommender_id": "rec\x00"}}, "recommender_id"),
        ("GET", "/v1/jobs", {"params": {"cursor": _cursor("2020-01-01T00:00:00")}}, "cursor"),
        (
            "GET",
            "/v1/files",
            {"params": {"cursor": _cursor("9999-12-31T23:59:59-14:00")}},
            "cursor",
        ),
        (
            "GET",
            "/v1/jobs",
            {"params": {"cursor": _cursor("2020-01-01T00:00:00+00:00", "x\x00")}},
            "cursor",
        ),
        ("GET", "/v1/jobs", {"params": {"limt": "5"}}, "limt"),
    ]
    for text, field in (
        ('"attribute": "pop\\u0000"', "biases.0.attribute"),
        ('"attribute": "pop\\ud800"', "biases.0.attribute"),
        ('"weight": Infinity', "biases.0.weight"),
        ('"weight": NaN', "biases.0.weight"),
    ):
        raw = json.dumps(body).replace('"attribute": "popularity_group"', text.split(", ")[0])
        if "weight" in text:
            raw = json.dumps(body).replace('"k": 5', f'"k": 5, {text}')
        headers = {"Content-Type": "application/json"}
        cases.append(("POST", "/v1/jobs", {"content": raw, "headers": headers}, field))
    name = json.dumps({"name": "x", "path": "/tmp/x"}).replace('"x"', '"x\\ud800"', 1)
    cases.append(
        (
            "POST",
            "/v1/base-models",
            {"content": name, "headers": {"Content-Type": "application/json"}},
            "name",
        )
    )
    for method, path, options, field in cases:
        response = client.request(method, path, **options)
        assert response.status_code == 422, (path, options, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["field"] == field, (path, options, response.json())
    with server.context.sessions() as session:
        from sqlalchemy import func, select

        from service.models import Job

        assert session.scalar(select(func.count()).select_from(Job)) == 1  # nothing stored


def test_bodies_that_are_not_readable_json_are_400(served) -> None:
    _, client, _ = served
    headers = {"Content-Type": "application/json"}
    digits = '{"recommender_id": "rec_x", "biases": [], "version": 1' + "0" * 5000 + "}"
    for raw in ('{"recommender_id": ', "[" * 100_000 + "]" * 100_000, digits):
        response = client.post("/v1/jobs", content=raw, headers=headers)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["code"] == "invalid_json" and "JSON" in body["detail"], body
    spec = client.get("/openapi.json").json()
    assert "400" in spec["paths"]["/v1/jobs"]["post"]["responses"]


def test_bad_range_headers_are_problems(served) -> None:
    _, client, _ = served
    spec = client.get("/openapi.json").json()
    download = "/v1/recommenders/{recommender_id}/versions/{number}/adapter"
    assert "416" in spec["paths"][download]["get"]["responses"]
    from service.problems import Problem
    from service.recommenders.router import _check_range

    for header in (
        "bytes=abc",
        "bytes=9" * 30,
        "bytes=100-200",
        "bytes=5-2",
        "items=0-1",
        "bytes=" + "1" * 5000 + "-",
    ):
        with pytest.raises(Problem) as refused:
            _check_range(header, 50)
        assert refused.value.status == 416
        assert refused.value.headers["Content-Range"] == "bytes */50"
    _check_range("bytes=0-9, 20-", 50)


def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(served) -> None:
    """The 401 comes back while the client has sent only the headers of a large upload."""
    import socket

    server, _, _ = served
    for authorization in ("", "Authorization: Bearer fudlr-wrong\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                (
                    "POST /v1/files HTTP/1.1\r\nHost: x\r\n"
                    "Content-Type: multipart/form-data; boundary=b\r\n"
                    f"Content-Length: {1 << 30}\r\n{authorization}\r\n"
                ).encode()
            )
            received = b""
            while chunk := sock.recv(65536):  # the server closes after its answer
                received += chunk
            answer = received.decode("latin-1")
        assert answer.startswith("HTTP/1.1 401"), answer
        assert "application/problem+json" in answer and "unauthorized" in answer
