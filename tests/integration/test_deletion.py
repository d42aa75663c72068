"""Deleting files and recommenders, and the tenant's quotas, through a real server on SQLite
and on PostgreSQL: what a deletion removes and keeps, refusals that store nothing, and
deletions a crash interrupted."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from service.auth.models import Tenant
from service.files.archives import pack
from service.models import Event, File, Job, Recommender, Version
from service.reaper import settle_trash
from service.settings import Settings
from service.storage import DURABLE, TenantStore
from tests.conftest import run_cli
from tests.integration.harness import InProcessServer, api_key, throwaway_database
from tests.integration.test_api import BIAS, Api, _adapter_files, _tar, problem

DATA = ("items", "users", "train", "valid", "test")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp(f"deletion-{request.param}")
    database = throwaway_database() if request.param == "postgresql" else nullcontext(None)
    with database as url:
        settings = Settings(
            data_dir=root,
            database_url=url,
            model_roots=[tmp_path_factory.getbasetemp()],
            reaper_interval_seconds=3600,
            quota_retry_after_seconds=7,
        )
        with InProcessServer(settings) as server:
            yield Api(server, {}, root)


@pytest.fixture
def tenant(api: Api) -> str:
    """A tenant of this test alone, so usage figures are the test's own."""
    name = f"t{secrets.token_hex(4)}"
    api.keys[name] = api_key(api.server.context.settings, name)
    return name


def _tenant_id(api: Api, name: str) -> str:
    with api.sessions()() as session:
        return session.scalar(select(Tenant.id).where(Tenant.name == name))


def _store(api: Api, name: str) -> TenantStore:
    return api.server.context.storage.tenant(_tenant_id(api, name))


def _durable_files(store: TenantStore) -> set[str]:
    return {
        str(path.relative_to(store.root))
        for top in DURABLE
        for path in (store.root / top).rglob("*")
        if path.is_file()
    }


def _trash(store: TenantStore) -> list[Path]:
    return list((store.root / "trash").glob("*"))


def _usage(api: Api, tenant: str) -> dict:
    return api.ok("GET", "/v1/usage", tenant)


def _register(api: Api, tenant: str, tiny_model: Path, tiny_adapter, tiny_bundle: Path) -> dict:
    """Upload the tiny adapter and bundle and register them (version 1 left `indexing`)."""
    files = _adapter_files(tiny_adapter[0])
    adapter = api.upload(_tar(files), "adapter", "a.tgz", tenant)
    assert adapter.status_code == 201, adapter.text
    data = {}
    for purpose in DATA:
        uploaded = api.upload((tiny_bundle / f"{purpose}.jsonl").read_bytes(), purpose, "d", tenant)
        assert uploaded.status_code == 201, uploaded.text
        data[purpose] = uploaded.json()["id"]
    base = api.ok("POST", "/v1/base-models", tenant, json={"name": "tiny", "path": str(tiny_model)})
    body = {
        "name": "tiny",
        "base_model_id": base["id"],
        "adapter_file_id": adapter.json()["id"],
        "data": data,
    }
    rec = api.ok("POST", "/v1/recommenders", tenant, json=body)
    return {"rec": rec["id"], "adapter": adapter.json(), "data": data, "body": body}


def _mark_ready(api: Api, recommender_id: str) -> None:
    with api.sessions().begin() as session:
        session.execute(
            update(Version).where(Version.recommender_id == recommender_id).values(state="ready")
        )


def _publish_version_2(api: Api, store: TenantStore, job_id: str, tmp: Path) -> Version:
    """What a worker leaves after a job succeeded: version 2 (another adapter, stored by
    content) and its index; the indexes and measurement caches of both versions."""
    with api.sessions()() as session:
        job = session.get_one(Job, job_id)
        first = session.scalars(
            select(Version).where(Version.recommender_id == job.recommender_id)
        ).one()
    repaired = tmp / "repaired"
    shutil.copytree(store.adapter(first.digest), repaired)
    config = json.loads((repaired / "adapter_config.json").read_text())
    (repaired / "adapter_config.json").write_text(json.dumps({**config, "repaired": True}))
    digest = pack(repaired, tmp / "repaired.tar.gz")
    store.put(tmp / "repaired.tar.gz", store.blob(digest))
    store.put(repaired, store.adapter(digest))
    with api.sessions().begin() as session:
        second = Version(
            id=f"ver_{secrets.token_hex(12)}",
            tenant_id=job.tenant_id,
            recommender_id=job.recommender_id,
            number=2,
            parent_number=1,
            job_id=job.id,
            digest=digest,
            bytes=store.blob(digest).stat().st_size,
            state="ready",
        )
        session.add(second)
        session.execute(
            update(Job).where(Job.id == job.id).values(state="succeeded", result_version=2)
        )
    for version in (first, second):
        (store.index(version.id)).mkdir(parents=True)
        (store.index(version.id) / "manifest.json").write_text("{}")
        (store.measurements(version.id)).mkdir(parents=True)
        (store.measurements(version.id) / "m.json").write_text("{}")
    return second


def test_a_deleted_file_is_gone_with_its_bytes_and_usage_follows(api: Api, tenant: str) -> None:
    store = _store(api, tenant)
    assert _usage(api, tenant) == {
        "object": "usage",
        "bytes_stored": 0,
        "max_bytes": 50 << 30,
        "active_jobs": 0,
        "max_jobs": 4,
    }
    content = b'{"user_id": "1"}\n{"user_id": "2"}\n'
    first = api.upload(content, "users", "users.jsonl", tenant).json()
    assert _usage(api, tenant)["bytes_stored"] == len(content)
    # the same bytes again: one blob, counted once
    second = api.upload(content, "users", "again.jsonl", tenant).json()
    assert _usage(api, tenant)["bytes_stored"] == len(content)

    response = api.call("DELETE", f"/v1/files/{first['id']}", tenant)
    assert response.status_code == 204 and response.content == b""
    problem(api.call("GET", f"/v1/files/{first['id']}", tenant), 404, "not_found")
    problem(api.call("DELETE", f"/v1/files/{first['id']}", tenant), 404, "not_found")
    # the other file still holds the blob
    assert store.blob(second["sha256"]).read_bytes() == content
    assert _usage(api, tenant)["bytes_stored"] == len(content)

    assert api.call("DELETE", f"/v1/files/{second['id']}", tenant).status_code == 204
    assert not store.blob(second["sha256"]).exists()
    assert _usage(api, tenant)["bytes_stored"] == 0
    assert api.ok("GET", "/v1/files", tenant)["data"] == []
    assert _trash(store) == []


def test_a_file_in_use_is_refused_and_kept(
    api: Api, tenant: str, tiny_model: Path, tiny_adapter, tiny_bundle: Path
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    store = _store(api, tenant)
    before, stored = _usage(api, tenant), _durable_files(store)
    for file_id in (registered["adapter"]["id"], registered["data"]["train"]):
        body = problem(api.call("DELETE", f"/v1/files/{file_id}", tenant), 409, "in_use")
        assert registered["rec"] in body["detail"]
        assert api.ok("GET", f"/v1/files/{file_id}", tenant)["id"] == file_id
    assert _usage(api, tenant) == before and _durable_files(store) == stored
    assert store.blob(registered["adapter"]["details"]["digest"]).is_file()
    assert _trash(store) == []


def test_a_recommender_is_deleted_with_its_versions_jobs_and_artifacts(
    api: Api, tenant: str, tiny_model: Path, tiny_adapter, tiny_bundle: Path, tmp_path: Path
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    rec, store = registered["rec"], _store(api, tenant)
    kept = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)  # another, untouched
    _mark_ready(api, rec)
    job = api.call("POST", "/v1/jobs", tenant, json={"recommender_id": rec, "biases": [BIAS]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    body = problem(api.call("DELETE", f"/v1/recommenders/{rec}", tenant), 409, "in_use")
    assert job_id in body["detail"] and "queued" in body["detail"]
    assert api.ok("GET", f"/v1/recommenders/{rec}", tenant)["id"] == rec

    second = _publish_version_2(api, store, job_id, tmp_path)
    with api.sessions()() as session:
        first = session.scalars(
            select(Version).where(Version.recommender_id == rec, Version.number == 1)
        ).one()
        bundle = store.bundle(session.get_one(Recommender, rec).bundle_digest)
    assert bundle.is_dir()
    gone = [store.index(first.id), store.index(second.id), store.measurements(first.id)]
    gone += [store.measurements(second.id), *store.content(second.digest)]
    assert all(path.exists() for path in gone)
    stored_before = _usage(api, tenant)["bytes_stored"]

    response = api.call("DELETE", f"/v1/recommenders/{rec}", tenant)
    assert response.status_code == 204, response.text
    problem(api.call("GET", f"/v1/recommenders/{rec}", tenant), 404, "not_found")
    problem(api.call("GET", f"/v1/jobs/{job_id}", tenant), 404, "not_found")
    problem(api.call("DELETE", f"/v1/recommenders/{rec}", tenant), 404, "not_found")
    assert [j["id"] for j in api.ok("GET", "/v1/jobs", tenant)["data"]] == []
    assert api.ok("GET", "/v1/jobs", tenant, params={"recommender_id": rec})["data"] == []
    assert [r["id"] for r in api.ok("GET", "/v1/recommenders", tenant)["data"]] == [kept["rec"]]
    with api.sessions()() as session:
        subjects = [job_id, first.id, second.id]
        assert session.scalars(select(Event).where(Event.subject_id.in_(subjects))).all() == []
        assert session.scalars(select(Version).where(Version.recommender_id == rec)).all() == []
    assert not any(path.exists() for path in gone)
    # version 1 is the uploaded adapter, which its file still holds; the other recommender
    # shares the bundle (same data files' contents)
    assert all(path.exists() for path in store.content(first.digest))
    assert bundle.is_dir()
    assert _usage(api, tenant)["bytes_stored"] < stored_before
    assert _trash(store) == []

    # nothing of the deleted recommender holds its files any more
    for file_id in [registered["adapter"]["id"], *registered["data"].values()]:
        assert api.call("DELETE", f"/v1/files/{file_id}", tenant).status_code == 204
    assert api.call("DELETE", f"/v1/recommenders/{kept['rec']}", tenant).status_code == 409
    _mark_ready(api, kept["rec"])
    assert api.call("DELETE", f"/v1/recommenders/{kept['rec']}", tenant).status_code == 204
    for file_id in [kept["adapter"]["id"], *kept["data"].values()]:
        assert api.call("DELETE", f"/v1/files/{file_id}", tenant).status_code == 204
    assert _durable_files(store) == set()
    assert _usage(api, tenant)["bytes_stored"] == 0


def test_another_tenants_deletes_are_404_and_change_nothing(
    api: Api, tenant: str, tiny_model: Path, tiny_adapter, tiny_bundle: Path
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    _mark_ready(api, registered["rec"])
    unused = api.upload(b'{"user_id": "9"}\n', "users", "u.jsonl", tenant).json()["id"]
    other = f"o{secrets.token_hex(4)}"
    api.keys[other] = api_key(api.server.context.settings, other)
    before = _durable_files(_store(api, tenant))
    for path in (f"/v1/files/{unused}", f"/v1/recommenders/{registered['rec']}"):
        problem(api.call("DELETE", path, other), 404, "not_found")
        assert api.call("GET", path, tenant).status_code == 200
    assert _durable_files(_store(api, tenant)) == before
    assert _usage(api, other)["bytes_stored"] == 0


def test_the_byte_quota_refuses_new_bytes_and_stores_nothing(
    api: Api,
    tenant: str,
    tiny_model: Path,
    tiny_adapter,
    tiny_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    _mark_ready(api, registered["rec"])
    store = _store(api, tenant)
    stored = _usage(api, tenant)["bytes_stored"]
    settings = api.server.context.settings
    content = b'{"user_id": "1"}\n'
    monkeypatch.setattr(settings, "max_tenant_bytes", stored + len(content) - 1)
    assert _usage(api, tenant)["max_bytes"] == stored + len(content) - 1
    before = api.stored(tenant)
    body = problem(api.upload(content, "users", "u.jsonl", tenant), 413, "quota_exceeded")
    assert str(stored) in body["detail"]
    files = _adapter_files(tiny_adapter[0])
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "other": True}).encode()
    problem(api.upload(_tar(files), "adapter", "b.tgz", tenant), 413, "quota_exceeded")
    assert api.stored(tenant) == before

    monkeypatch.setattr(settings, "max_tenant_bytes", stored + len(content))
    assert api.upload(content, "users", "u.jsonl", tenant).status_code == 201
    assert _usage(api, tenant)["bytes_stored"] == stored + len(content)
    # full: bytes already stored still upload (nothing new), new work does not start
    train = (tiny_bundle / "train.jsonl").read_bytes()
    assert api.upload(train, "train", "again.jsonl", tenant).status_code == 201
    job = {"recommender_id": registered["rec"], "biases": [BIAS]}
    problem(api.call("POST", "/v1/jobs", tenant, json=job), 413, "quota_exceeded")
    problem(
        api.call("POST", "/v1/recommenders", tenant, json=registered["body"]),
        413,
        "quota_exceeded",
    )
    assert api.ok("GET", "/v1/jobs", tenant)["data"] == []
    assert len(api.ok("GET", "/v1/recommenders", tenant)["data"]) == 1

    monkeypatch.undo()
    assert api.call("POST", "/v1/jobs", tenant, json=job).status_code == 202
    assert _trash(store) == []


def test_the_job_quota_answers_429_with_retry_after(
    api: Api,
    tenant: str,
    tiny_model: Path,
    tiny_adapter,
    tiny_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    _mark_ready(api, registered["rec"])
    monkeypatch.setattr(api.server.context.settings, "max_tenant_jobs", 2)
    body = {"recommender_id": registered["rec"], "biases": [BIAS]}

    def submit(key: str):
        return api.call("POST", "/v1/jobs", tenant, json=body, headers={"Idempotency-Key": key})

    first, second = submit("one").json(), submit("two").json()
    assert _usage(api, tenant)["active_jobs"] == 2
    refused = submit("three")
    problem(refused, 429, "quota_exceeded")
    assert refused.headers["retry-after"] == "7"
    assert submit("one").json()["id"] == first["id"]  # a replay is no new job
    assert len(api.ok("GET", "/v1/jobs", tenant)["data"]) == 2

    api.ok("POST", f"/v1/jobs/{second['id']}/cancel", tenant)
    assert _usage(api, tenant)["active_jobs"] == 1
    assert submit("three").status_code == 202
    assert _usage(api, tenant)["active_jobs"] == 2


def test_an_interrupted_deletion_is_undone_or_finished_from_the_database(
    api: Api, tenant: str
) -> None:
    """The trash is settled from the database: a file still recorded gets its bytes back,
    a file whose row is gone loses them; an error inside the deletion restores at once."""
    store = _store(api, tenant)
    content = b'{"user_id": "1"}\n'
    record = api.upload(content, "users", "u.jsonl", tenant).json()
    blob, sessions = store.blob(record["sha256"]), api.sessions()

    with pytest.raises(RuntimeError), store.removing(record["id"], store.content(record["sha256"])):
        assert not blob.exists()
        raise RuntimeError("the commit failed")
    assert blob.read_bytes() == content and _trash(store) == []

    # a crash after the move, before the commit: the row is there, the bytes come back
    store.removing(record["id"], store.content(record["sha256"])).__enter__()
    assert not blob.exists() and len(_trash(store)) == 1
    assert settle_trash(sessions, api.server.context.storage) == [record["id"]]
    assert blob.read_bytes() == content and _trash(store) == []
    assert api.ok("GET", f"/v1/files/{record['id']}", tenant)["id"] == record["id"]

    # a crash after the commit: the row is gone, so are the bytes
    store.removing(record["id"], store.content(record["sha256"])).__enter__()
    with sessions.begin() as session:
        session.execute(delete(File).where(File.id == record["id"]))
    assert settle_trash(sessions, api.server.context.storage) == [record["id"]]
    assert not blob.exists() and _trash(store) == []
    assert _usage(api, tenant)["bytes_stored"] == 0


def test_the_cli_deletes_and_shows_usage(
    api: Api,
    tenant: str,
    tiny_model: Path,
    tiny_adapter,
    tiny_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered = _register(api, tenant, tiny_model, tiny_adapter, tiny_bundle)
    monkeypatch.setenv("FUDLR_URL", api.server.url)
    monkeypatch.setenv("FUDLR_API_KEY", api.keys[tenant])
    code, out, _ = run_cli(["usage"], capsys)
    assert code == 0 and "of 50.0 GiB" in out and "0 of 4" in out

    code, _, err = run_cli(["files", "delete", registered["data"]["items"]], capsys)
    assert code == 2 and err.count("\n") == 1 and "in_use (409)" in err, err
    code, _, err = run_cli(["recommenders", "delete", registered["rec"]], capsys)
    assert code == 2 and "in_use (409)" in err and "indexing" in err, err
    _mark_ready(api, registered["rec"])
    code, _, err = run_cli(["recommenders", "delete", registered["rec"]], capsys)
    assert code == 0 and registered["rec"] in err
    code, _, err = run_cli(["files", "delete", registered["data"]["items"]], capsys)
    assert code == 0, err
    code, _, err = run_cli(["recommenders", "delete", registered["rec"]], capsys)
    assert code == 2 and "not_found (404)" in err
