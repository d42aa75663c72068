"""Python client of the FUDLR service (httpx), with the API's responses as typed models
(clients/models.py); it needs none of the server's code.

    from clients.sdk import Client
    client = Client()                      # FUDLR_URL, FUDLR_API_KEY
    rec = client.register("ml100k", base_model="/models/smollm2", adapter="adapters/v1",
                          bundle="data/ml100k")
    client.wait_ready(rec.id)
    job = client.submit(rec.id, ["item:popularity_group:MGU@5"])
    job = client.wait(job.id)              # a progress bar; raises JobFailed unless succeeded
    client.download(rec.id, job.result_version, "adapters/v2")

Every error of the API arrives as `ApiError` (status, stable code, where); submissions
carry an Idempotency-Key, so retrying one never creates a second job.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel

from clients.models import (
    BaseModelOut,
    EventOut,
    FileOut,
    JobOut,
    RecommenderOut,
    UsageOut,
    VersionOut,
)
from fudlr.errors import FudlrError
from fudlr.repair.spec import BiasSpec
from fudlr.states import TERMINAL, JobState, VersionState

if TYPE_CHECKING:
    from rich.progress import Progress

DEFAULT_URL = "http://127.0.0.1:8000"
DATA_PURPOSES = ("items", "users", "train", "valid", "test")
ModelT = TypeVar("ModelT", bound=BaseModel)


class ApiError(FudlrError):
    """A problem+json answer: `status`, `code`, `detail` and the whole `problem`."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status, self.problem = status, dict(problem)
        self.code = str(problem.get("code", "http_error"))
        self.detail = str(problem.get("detail", ""))
        where = ":".join(
            str(problem[key]) for key in ("file", "line") if problem.get(key) is not None
        )
        field = f"field '{problem['field']}': " if problem.get("field") else ""
        prefix = f"{where}: " if where else ""
        super().__init__(f"{self.code} ({status}): {prefix}{field}{self.detail}")


class JobFailed(FudlrError):
    """`wait` ended on a job that did not succeed."""

    def __init__(self, job: JobOut) -> None:
        self.job = job
        reason = job.error.detail if job.error else "no reason recorded"
        super().__init__(f"job {job.id} {job.state}: {reason}")


class Client:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = url or os.environ.get("FUDLR_URL") or DEFAULT_URL
        api_key = api_key or os.environ.get("FUDLR_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            transport=transport or httpx.HTTPTransport(retries=2),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise FudlrError(f"cannot reach {self.http.base_url}: {error}") from None
        return _checked(response)

    def _get(self, model: type[ModelT], path: str, **params: Any) -> ModelT:
        clean = {key: value for key, value in params.items() if value is not None}
        return model.model_validate(self._request("GET", path, params=clean).json())

    def _pages(self, model: type[ModelT], path: str, **params: Any) -> Iterator[ModelT]:
        cursor = None
        while True:
            clean = {k: v for k, v in {**params, "cursor": cursor}.items() if v is not None}
            page = self._request("GET", path, params=clean).json()
            yield from (model.model_validate(item) for item in page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # files and base models

    def upload(self, path: str | Path, purpose: str) -> FileOut:
        """Upload a data file, or an adapter (a PEFT directory is packed into a .tar.gz)."""
        path = Path(path)
        if path.is_dir():
            with tempfile.TemporaryDirectory() as scratch:
                archive = Path(scratch) / f"{path.name}.tar.gz"
                with tarfile.open(archive, "w:gz") as tar:
                    for child in sorted(path.iterdir()):
                        if child.is_file():
                            tar.add(child, arcname=child.name)
                return self.upload(archive, purpose)
        with path.open("rb") as handle:
            response = self._request(
                "POST", "/v1/files", data={"purpose": purpose}, files={"file": (path.name, handle)}
            )
        return FileOut.model_validate(response.json())

    def delete_file(self, file_id: str) -> None:
        """Delete an uploaded file (ApiError `in_use` while a recommender uses it)."""
        self._request("DELETE", f"/v1/files/{file_id}")

    def register_base_model(
        self, name: str, path: str | Path, sha256: str | None = None
    ) -> BaseModelOut:
        body = {"name": name, "path": str(Path(path).resolve()), "sha256": sha256}
        response = self._request("POST", "/v1/base-models", json=body)
        return BaseModelOut.model_validate(response.json())

    # recommenders and versions

    def create_recommender(
        self,
        name: str,
        base_model_id: str,
        adapter_file_id: str,
        data: Mapping[str, str],
        index: Mapping[str, Any] | None = None,
        decoding: str | None = None,
    ) -> RecommenderOut:
        """`decoding` (constrained, grounded): how jobs decode its lists; None: the
        service's default."""
        body = {
            "name": name,
            "base_model_id": base_model_id,
            "adapter_file_id": adapter_file_id,
            "data": dict(data),
            "index": dict(index or {}),
        }
        if decoding is not None:
            body["decoding"] = decoding
        response = self._request("POST", "/v1/recommenders", json=body)
        return RecommenderOut.model_validate(response.json())

    def register(
        self,
        name: str,
        base_model: str | Path,
        adapter: str | Path,
        bundle: str | Path,
        index: Mapping[str, Any] | None = None,
        decoding: str | None = None,
    ) -> RecommenderOut:
        """Everything at once: the base model (a registered id, or a directory to register),
        the adapter (a PEFT directory or archive) and the bundle's files."""
        if isinstance(base_model, str) and base_model.startswith("bm_"):
            base_model_id = base_model
        else:
            base_model_id = self.register_base_model(Path(base_model).name, base_model).id
        adapter_file = self.upload(adapter, "adapter")
        bundle = Path(bundle)
        data = {
            purpose: self.upload(bundle / f"{purpose}.jsonl", purpose).id
            for purpose in DATA_PURPOSES
            if (bundle / f"{purpose}.jsonl").is_file()
        }
        return self.create_recommender(name, base_model_id, adapter_file.id, data, index, decoding)

    def recommender(self, recommender_id: str) -> RecommenderOut:
        return self._get(RecommenderOut, f"/v1/recommenders/{recommender_id}")

    def recommenders(self) -> Iterator[RecommenderOut]:
        return self._pages(RecommenderOut, "/v1/recommenders")

    def delete_recommender(self, recommender_id: str) -> None:
        """Delete a recommender with its versions, indexes and finished jobs (ApiError
        `in_use` while a job of it is unfinished or a version is being indexed)."""
        self._request("DELETE", f"/v1/recommenders/{recommender_id}")

    def versions(self, recommender_id: str) -> list[VersionOut]:
        versions, after = [], 0
        while True:
            page = self._request(
                "GET", f"/v1/recommenders/{recommender_id}/versions", params={"after": after}
            ).json()
            versions += [VersionOut.model_validate(item) for item in page["data"]]
            if not page.get("next_cursor"):
                return versions
            after = int(page["next_cursor"])

    def version(self, recommender_id: str, number: int) -> VersionOut:
        return self._get(VersionOut, f"/v1/recommenders/{recommender_id}/versions/{number}")

    def wait_ready(
        self, recommender_id: str, version: int = 1, poll: float = 1.0, timeout: float | None = None
    ) -> VersionOut:
        """Until the version's index is built; raises ApiError-like FudlrError if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.version(recommender_id, version)
            if current.state == VersionState.READY:
                return current
            if current.state == VersionState.FAILED:
                reason = current.error.detail if current.error else "no reason recorded"
                raise FudlrError(f"indexing {recommender_id} v{version} failed: {reason}")
            if deadline is not None and time.monotonic() > deadline:
                raise FudlrError(f"{recommender_id} v{version} still {current.state}")
            time.sleep(poll)

    def download(
        self, recommender_id: str, version: int, out: str | Path, extract: bool = True
    ) -> Path:
        """The version's adapter, checked against its sha256 (the ETag): unpacked into `out`
        (a PEFT directory) or, with extract=False, saved as the .tar.gz file `out`."""
        path = f"/v1/recommenders/{recommender_id}/versions/{version}/adapter"
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            archive = Path(scratch) / "adapter.tar.gz"
            hasher = hashlib.sha256()
            try:
                with self.http.stream("GET", path) as response:
                    if response.status_code >= 400:
                        response.read()
                    digest = _checked(response).headers.get("ETag", "").strip('"')
                    with archive.open("wb") as handle:
                        for chunk in response.iter_bytes(1 << 20):
                            hasher.update(chunk)
                            handle.write(chunk)
            except httpx.TransportError as error:
                raise FudlrError(f"cannot reach {self.http.base_url}: {error}") from None
            if hasher.hexdigest() != digest:
                raise FudlrError(f"download of {recommender_id} v{version} is corrupt (sha256)")
            if not extract:
                archive.replace(out)
                return out
            unpacked = Path(scratch) / "adapter"
            with tarfile.open(archive, mode="r:gz") as tar:
                tar.extractall(unpacked, filter="data")  # no links, no paths out of the folder
            out.mkdir(exist_ok=True)
            for path in unpacked.iterdir():
                path.replace(out / path.name)
        return out

    def usage(self) -> UsageOut:
        """Bytes stored and unfinished jobs, against the tenant's quotas."""
        return self._get(UsageOut, "/v1/usage")

    # jobs

    def submit(
        self,
        recommender_id: str,
        biases: Sequence[str | Mapping[str, Any]],
        version: int | None = None,
        budget: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> JobOut:
        """Biases as `item:popularity_group:MGU@5` strings or as objects."""
        body = {
            "recommender_id": recommender_id,
            "version": version,
            "biases": [_bias(bias) for bias in biases],
            "budget": dict(budget or {}),
            "options": dict(options or {}),
        }
        key = idempotency_key or str(uuid.uuid4())
        response = self._request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return JobOut.model_validate(response.json())

    def job(self, job_id: str) -> JobOut:
        return self._get(JobOut, f"/v1/jobs/{job_id}")

    def jobs(self, recommender_id: str | None = None, state: str | None = None) -> Iterator[JobOut]:
        return self._pages(JobOut, "/v1/jobs", recommender_id=recommender_id, state=state)

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[EventOut]:
        page = self._request(
            "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit}
        ).json()
        return [EventOut.model_validate(item) for item in page["data"]]

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    def watch(
        self,
        job_id: str,
        on_update: Callable[[JobOut, list[EventOut]], None],
        poll: float = 1.0,
        timeout: float | None = None,
    ) -> JobOut:
        """Poll until the job ends, handing each state and the new events to `on_update`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            job = self.job(job_id)
            events = self.events(job_id, after=after, limit=1000)
            if events:
                after = events[-1].id
            on_update(job, events)
            if job.state in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise FudlrError(f"job {job_id} still {job.state} after {timeout:g}s")
            time.sleep(poll)

    def wait(
        self, job_id: str, progress: bool = True, poll: float = 1.0, timeout: float | None = None
    ) -> JobOut:
        """Until the job ends, with a progress bar (stage and fraction) and its events;
        raises JobFailed unless it succeeded."""
        if not progress:
            job = self.watch(job_id, lambda *_: None, poll, timeout)
        else:
            with _progress() as bar:
                task = bar.add_task(job_id, total=1.0, state="")

                def show(job: JobOut, events: list[EventOut]) -> None:
                    for event in events:
                        if event.kind != "stage":
                            bar.console.print(
                                f"[dim]{event.created_at:%H:%M:%S}[/] {event.message}"
                            )
                    description = f"{job.id} {job.stage or ''}".strip()
                    done = 1.0 if job.state == JobState.SUCCEEDED else job.progress or 0.0
                    bar.update(
                        task,
                        description=description,
                        completed=done,
                        state=job.state,
                    )

                job = self.watch(job_id, show, poll, timeout)
        if job.state != JobState.SUCCEEDED:
            raise JobFailed(job)
        return job


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or its problem+json as an ApiError."""
    if response.status_code < 400:
        return response
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:200]}
    raise ApiError(response.status_code, problem)


def _progress() -> Progress:
    """The job's current stage, how far it is through it, and the job's state."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from fudlr.console import console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _bias(bias: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(bias, str):
        spec = BiasSpec.parse(bias)
        return {
            "side": spec.side,
            "attribute": spec.attribute,
            "metric": spec.metric,
            "k": spec.k,
            "weight": spec.weight,
        }
    return dict(bias)
