"""A schema-driven fuzzer over `/openapi.json` (schemathesis) against a real server, on
SQLite and on PostgreSQL: no answer is a 5xx, and every answer is one the document
describes (status, media type, body schema). Bounded: a few dozen examples per operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from bench.load import seed_job  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.integration.harness import InProcessServer, api_key  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 25


@pytest.fixture
def fuzzed(tmp_path: Path, database_url: str) -> Iterator[tuple[InProcessServer, str]]:
    """A server with one tenant's job, so that some generated ids hit nothing and the
    routes still run their queries."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        max_upload_bytes=256 << 10,
        max_extracted_bytes=1 << 20,
        model_roots=[tmp_path / "models"],
        reaper_interval_seconds=3600,
    )
    key = api_key(settings, "fuzz")
    seed_job(settings.db_url, "fuzz")
    with InProcessServer(settings) as server:
        yield server, key


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors_and_only_documented_answers(fuzzed, mode: str) -> None:
    """Every operation, with data that fits its schema and data that does not."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi import checks

    # what every answer must be: no 5xx, and one the document describes. Not among them:
    # "valid data is accepted" (uploads and registrations are checked beyond their schema)
    # and "invalid data is refused" (undeclared headers are ignored, as HTTP allows)
    required = [
        not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]

    server, key = fuzzed
    api = schemathesis.openapi.from_dict(server.app.openapi())
    headers = {"Authorization": f"Bearer {key}"}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 17
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=strategy)
        def call(case) -> None:
            case.call_and_validate(
                base_url=server.url, headers=headers, checks=required, timeout=60
            )

        try:
            call()
        except Unsatisfiable:  # nothing to break in an operation without inputs
            assert mode == "negative", operation.label
