"""Every error the API answers is `application/problem+json` (RFC 9457) with a stable `code`.

Clients branch on `code`, never on `detail`. Input errors add where they are: `file`
(the uploaded file's name), `file_id`, `line` and `field`. Server paths never appear.

Codes: invalid_json, unauthorized, not_found, method_not_allowed, validation_error,
payload_too_large, invalid_data, invalid_archive, unsafe_archive, unsafe_weights,
invalid_adapter, invalid_base_model, adapter_mismatch, invalid_bias, unmeasurable_bias,
not_decodable, index_mismatch, wrong_purpose, version_not_ready, idempotency_conflict,
job_finished, report_unavailable, range_not_satisfiable, quota_exceeded, in_use,
overloaded, not_ready, internal_error. A failed job's `error.code` is one of
repair_rejected, unmeasurable_bias, invalid_input, failed, internal_error, worker_lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from fudlr.errors import InputError

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger(__name__)


class ProblemOut(BaseModel):
    """The body of every error (documentation; extra members such as `errors` may follow)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str
    file: str | None = None
    file_id: str | None = None
    line: int | None = None
    field: str | None = None


_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": description,
        "content": {MEDIA_TYPE: {"schema": ProblemOut.model_json_schema()}},
        **({"headers": _RETRY_AFTER} if status in (429, 503) else {}),
    }
    for status, description in (
        (400, "the request body is not JSON the server can read"),
        (401, "missing, unknown or revoked API key"),
        (404, "no such object for this tenant"),
        (409, "the object is not in a state that allows this, or is in use (`in_use`)"),
        (
            413,
            "the request body is too large, or the tenant's byte quota is reached "
            "(`quota_exceeded`)",
        ),
        (422, "the request or its data is invalid"),
        (429, "the tenant's quota of unfinished jobs is reached (`quota_exceeded`)"),
        (503, "the server is busy; retry after `Retry-After` seconds"),
    )
}


class Problem(HTTPException):
    """An error answer: HTTP status, stable code, one-line detail and optional location.

    An HTTPException, so that FastAPI lets it through even when raised while it reads a
    request body (the upload size limit).
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=dict(headers or {}))
        self.status, self.code = status, code
        self.extra = {key: value for key, value in extra.items() if value is not None}

    def body(self, instance: str) -> dict[str, Any]:
        return {
            "type": f"urn:fudlr:problem:{self.code}",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            "instance": instance,
            **self.extra,
        }


def not_found(kind: str, identifier: str) -> Problem:
    """The same answer for an object that does not exist and one of another tenant."""
    return Problem(404, "not_found", f"{kind} '{identifier}' not found")


def input_problem(
    error: InputError,
    code: str = "invalid_data",
    names: Mapping[str, Mapping[str, str]] | None = None,
) -> Problem:
    """An InputError of the method as a problem; `names` maps a server path (or file name)
    to what the client knows it by ({"file": ..., "file_id": ...}), else the base name."""
    where: Mapping[str, str] = {}
    if error.file is not None:
        path = Path(error.file)
        names = names or {}
        where = names.get(error.file) or names.get(path.name) or {"file": path.name}
    return Problem(422, code, error.reason, line=error.line, field=error.field, **where)


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers or None,
    )


def install(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's validation, Starlette's 404/405) to problems."""

    async def on_problem(request: Request, problem: Problem) -> JSONResponse:
        return problem_response(problem, request)

    async def on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        malformed = [e for e in error.errors() if e.get("type") == "json_invalid"]
        if malformed:
            where = malformed[0]["loc"][-1]
            reason = malformed[0].get("ctx", {}).get("error", "malformed")
            problem = Problem(
                400, "invalid_json", f"the request body is not valid JSON ({reason} at {where})"
            )
            return problem_response(problem, request)
        errors = [
            {"field": ".".join(str(p) for p in e["loc"][1:]) or None, "reason": e["msg"]}
            for e in error.errors()
        ]
        first = errors[0] if errors else {"field": None, "reason": "invalid request"}
        where = f"field '{first['field']}': " if first["field"] else ""
        problem = Problem(
            422,
            "validation_error",
            f"{where}{first['reason']}",
            field=first["field"],
            errors=errors,
        )
        return problem_response(problem, request)

    async def on_http(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI could not parse the body at all
            problem = Problem(
                400,
                "invalid_json",
                "the request body is not JSON the server can read (malformed, nested too "
                "deeply or a number with too many digits)",
            )
            return problem_response(problem, request)
        codes = {
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }
        code = codes.get(error.status_code, HTTPStatus(error.status_code).phrase.lower())
        problem = Problem(error.status_code, code.replace(" ", "_"), str(error.detail))
        return problem_response(problem, request)

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(500, "internal_error", "internal error; the server log has details")
        return problem_response(problem, request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
