"""The HTTP API through a real uvicorn server (SQLite, filesystem broker, no worker): auth,
tenant isolation, every refusal as problem+json with nothing stored half-way, jobs'
idempotency, cancellation, pagination, downloads with ETags, health and metrics."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from fudlr.data.bundle import Bundle
from fudlr.repair.config import SETTINGS
from service.auth.models import Tenant
from service.files.models import File
from service.jobs.schemas import Budget, Options
from service.models import Job, Recommender, Version
from service.settings import Settings
from tests.conftest import out_of_bounds, run_cli, twin_titles_bundle
from tests.integration.harness import InProcessServer, api_key

LIMIT = 512 << 10  # uploads; the tiny bundle's biggest file is ~90 KiB
UNPACKED = 1 << 20
LINE = 64 << 10
BIAS = {"side": "item", "attribute": "popularity_group", "metric": "MGU", "k": 5}


@dataclass
class Api:
    server: InProcessServer
    keys: dict[str, str]
    root: Path

    def call(self, method: str, path: str, tenant: str | None = "a", **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if tenant is not None:
            headers["Authorization"] = f"Bearer {self.keys.get(tenant, tenant)}"
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kwargs)

    def ok(self, method: str, path: str, tenant: str = "a", **kwargs) -> dict:
        response = self.call(method, path, tenant, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    def upload(self, content: bytes, purpose: str, name: str, tenant: str = "a") -> httpx.Response:
        return self.call(
            "POST", "/v1/files", tenant, data={"purpose": purpose}, files={"file": (name, content)}
        )

    def sessions(self):
        return self.server.context.sessions

    def stored(self, tenant: str = "a") -> tuple[int, set[str]]:
        """What the tenant has: file rows and artifact paths (staging must be empty)."""
        with self.sessions()() as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
            rows = session.scalar(select(func.count()).where(File.tenant_id == tenant_id))
        tree = self.root / "artifacts" / "tenants" / tenant_id
        paths = {str(p.relative_to(tree)) for p in tree.rglob("*")} if tree.exists() else set()
        assert not [p for p in paths if p.startswith("tmp/")], paths
        return rows, paths


def problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["detail"], body
    return body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    root = tmp_path_factory.mktemp("api")
    settings = Settings(
        data_dir=root,
        max_upload_bytes=LIMIT,
        max_extracted_bytes=UNPACKED,
        max_line_bytes=LINE,
        max_tenant_jobs=100,  # no worker runs: the jobs of these tests stay queued
        model_roots=[tmp_path_factory.getbasetemp()],
        reaper_interval_seconds=3600,
    )
    keys = {tenant: api_key(settings, tenant) for tenant in ("a", "b")}
    with InProcessServer(settings) as server:
        yield Api(server, keys, root)


def _tar(entries: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buffer.getvalue()


def _adapter_files(adapter: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(adapter.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def registered(api: Api, tiny_model: Path, tiny_adapter, tiny_bundle: Path) -> dict:
    """Tenant a's base model, files and a recommender (left `indexing`: no worker runs)."""
    files = _adapter_files(tiny_adapter[0])
    adapter = api.upload(_tar({f"adapter/{k}": v for k, v in files.items()}), "adapter", "a.tgz")
    assert adapter.status_code == 201, adapter.text
    data = {
        purpose: api.upload(
            (tiny_bundle / f"{purpose}.jsonl").read_bytes(), purpose, f"{purpose}.jsonl"
        ).json()["id"]
        for purpose in ("items", "users", "train", "valid", "test")
    }
    base = api.ok("POST", "/v1/base-models", json={"name": "tiny", "path": str(tiny_model)})
    body = {
        "name": "tiny",
        "base_model_id": base["id"],
        "adapter_file_id": adapter.json()["id"],
        "data": data,
    }
    created = api.call("POST", "/v1/recommenders", json=body)
    assert created.status_code == 201, created.text
    return {
        "base": base,
        "adapter": adapter.json(),
        "data": data,
        "body": body,
        "rec": created.json(),
    }


@pytest.fixture(scope="module")
def ready(api: Api, registered: dict) -> str:
    """A second recommender on the same files whose version 1 is marked indexed."""
    rec = api.ok("POST", "/v1/recommenders", json={**registered["body"], "name": "ready"})
    with api.sessions().begin() as session:
        session.execute(
            update(Version).where(Version.recommender_id == rec["id"]).values(state="ready")
        )
    return rec["id"]


def test_openapi_docs_health_and_readiness(api: Api) -> None:
    spec = httpx.get(api.server.url + "/openapi.json").json()
    assert {
        "/v1/files",
        "/v1/jobs/{job_id}/events",
        "/v1/recommenders/{recommender_id}/versions/{number}/adapter",
    } <= set(spec["paths"])
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert httpx.get(api.server.url + "/docs").status_code == 200
    assert httpx.get(api.server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(api.server.url + "/readyz").json()["checks"] == {
        "database": "ok",
        "broker": "ok",
    }


def test_registration_uploads_and_version_one(
    api: Api, registered: dict, tiny_bundle: Path, tiny_adapter
) -> None:
    train = api.ok("GET", f"/v1/files/{registered['data']['train']}")
    content = (tiny_bundle / "train.jsonl").read_bytes()
    assert train["sha256"] == hashlib.sha256(content).hexdigest() and train["bytes"] == len(content)
    assert train["details"]["rows"] == len(content.decode().splitlines())
    adapter = registered["adapter"]["details"]
    assert adapter["peft_type"] == "LORA" and adapter["lora_tensors"] > 0
    assert (
        "adapter_config.json" in adapter["files"]
        and "adapter_model.safetensors" in adapter["files"]
    )
    rec = registered["rec"]
    assert rec["state"] == "indexing" and rec["latest_version"] == 1
    version = api.ok("GET", f"/v1/recommenders/{rec['id']}/versions/1")
    assert (
        version["digest"] == adapter["digest"]
        and version["parent"] is None
        and version["job_id"] is None
    )

    download = api.call("GET", f"/v1/recommenders/{rec['id']}/versions/1/adapter")
    assert download.status_code == 200 and download.headers["etag"] == f'"{version["digest"]}"'
    assert hashlib.sha256(download.content).hexdigest() == version["digest"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert {m.name for m in tar.getmembers()} == set(adapter["files"])
        weights = tar.extractfile("adapter_model.safetensors").read()
    assert weights == (tiny_adapter[0] / "adapter_model.safetensors").read_bytes()
    again = api.upload(_zip(_adapter_files(tiny_adapter[0])), "adapter", "same.zip").json()
    assert (
        again["details"]["digest"] == adapter["digest"]
        and again["id"] != registered["adapter"]["id"]
    )
    cached = api.call(
        "GET",
        f"/v1/recommenders/{rec['id']}/versions/1/adapter",
        headers={"If-None-Match": f'W/"x", "{version["digest"]}"'},
    )
    assert cached.status_code == 304 and not cached.content


def _routes(api: Api) -> list[tuple[str, str]]:
    spec = httpx.get(api.server.url + "/openapi.json").json()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/v1/")
        for method in operations
    ]


def test_a_missing_wrong_or_revoked_key_is_401_on_every_route(api: Api) -> None:
    from service.auth.service import create_key, revoke_key

    with api.sessions().begin() as session:
        _, record, revoked = create_key(session, "c")
    with api.sessions().begin() as session:
        assert revoke_key(session, record.id)
    routes = _routes(api)
    assert len(routes) >= 17
    for method, path in routes:
        concrete = path.replace("{number}", "1").replace("{", "x").replace("}", "")
        for headers in (
            {},
            {"Authorization": "Bearer fudlr-wrong"},
            {"Authorization": f"Bearer {revoked}"},
            {"Authorization": "Basic abc"},
        ):
            response = httpx.request(method, api.server.url + concrete, headers=headers)
            body = problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", body


def test_another_tenants_objects_are_404_on_every_route(
    api: Api, registered: dict, ready: str
) -> None:
    job = api.call("POST", "/v1/jobs", json={"recommender_id": ready, "biases": [BIAS]})
    assert job.status_code == 202, job.text
    ids = {
        "file_id": registered["data"]["train"],
        "base_model_id": registered["base"]["id"],
        "recommender_id": ready,
        "number": "1",
        "job_id": job.json()["id"],
    }
    checked = 0
    for method, path in _routes(api):
        if "{" not in path:
            continue
        concrete = path.format(**ids)
        assert api.call(method, concrete, "a").status_code != 404, concrete  # it exists for a
        problem(api.call(method, concrete, "b"), 404, "not_found")
        checked += 1
    assert checked >= 10
    for listing in ("/v1/files", "/v1/base-models", "/v1/recommenders", "/v1/jobs"):
        assert api.ok("GET", listing, "b")["data"] == []
    problem(
        api.call("POST", "/v1/jobs", "b", json={"recommender_id": ready, "biases": [BIAS]}),
        404,
        "not_found",
    )
    problem(api.call("POST", "/v1/recommenders", "b", json=registered["body"]), 404, "not_found")


def _zip_with_link() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = 0o120777 << 16  # a symbolic link
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _link(kind: bytes, name: str, target: str) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return add


def _bad_archives(files: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    lora = json.loads(files["adapter_config.json"])
    return {
        "pickled .bin weights": (
            _tar({**files, "adapter_model.bin": b"\x80\x04pickle"}),
            "unsafe_weights",
        ),
        "pickled .pt weights in a zip": (
            _zip({**files, "extra/optimizer.pt": b"x"}),
            "unsafe_weights",
        ),
        "a '..' entry": (_tar({**files, "../evil.txt": b"x"}), "unsafe_archive"),
        "an absolute entry": (_tar({**files, "/tmp/evil.txt": b"x"}), "unsafe_archive"),
        "a symlink": (_tar(files, _link(tarfile.SYMTYPE, "link", "/etc/passwd")), "unsafe_archive"),
        "a hard link": (
            _tar(files, _link(tarfile.LNKTYPE, "hard", "adapter_config.json")),
            "unsafe_archive",
        ),
        "a device": (_tar(files, _link(tarfile.CHRTYPE, "tty", "")), "unsafe_archive"),
        "a zip symlink": (_zip_with_link(), "unsafe_archive"),
        "a zip '..' entry": (_zip({**files, "../../evil": b"x"}), "unsafe_archive"),
        "an adapter file in a folder": (
            _tar({**files, "sub/adapter_config.json": b"{}"}),
            "invalid_archive",
        ),
        "not an archive": (b"just some bytes, not a tarball", "invalid_archive"),
        "no adapter_config.json": (
            _tar({k: v for k, v in files.items() if k != "adapter_config.json"}),
            "invalid_adapter",
        ),
        "not LoRA": (
            _tar(
                {**files, "adapter_config.json": json.dumps({**lora, "peft_type": "IA3"}).encode()}
            ),
            "invalid_adapter",
        ),
        "weights not safetensors": (
            _tar(
                {
                    **files,
                    "adapter_model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}.....",
                }
            ),
            "invalid_adapter",
        ),
        "a zip bomb": (_tar({**files, "padding.txt": bytes(UNPACKED + 1)}), "payload_too_large"),
        "a bomb in ignored junk": (
            _tar({**files, "__MACOSX/._junk": bytes(UNPACKED + 1)}),
            "payload_too_large",
        ),
        "a zip bomb in ignored junk": (
            _zip({**files, "__MACOSX/._junk": bytes(UNPACKED + 1)}),
            "payload_too_large",
        ),
        "a corrupt zip": (
            _corrupt(_zip(files, zipfile.ZIP_STORED), b"peft_type"),
            "invalid_archive",
        ),
        "a truncated zip": (_zip(files)[:-30], "invalid_archive"),
        "an unsupported zip compression": (
            _zip_method(_zip(files, zipfile.ZIP_STORED), 98),
            "invalid_archive",
        ),
        "a member name longer than a file system allows": (
            _tar({**files, "x" * 300 + ".json": b"{}"}),
            "invalid_archive",
        ),
        "a config that is not an object": (
            _tar({**files, "adapter_config.json": b"[1, 2]"}),
            "invalid_adapter",
        ),
        "a deeply nested config": (
            _tar({**files, "adapter_config.json": b"[" * 100_000 + b"]" * 100_000}),
            "invalid_adapter",
        ),
        "a config with a rank of the wrong type": (
            _tar({**files, "adapter_config.json": json.dumps({**lora, "r": {"a": 1}}).encode()}),
            "invalid_adapter",
        ),
    }


def _corrupt(archive: bytes, inside: bytes) -> bytes:
    """`archive` with one byte of a stored member changed (its CRC no longer matches)."""
    at = archive.index(inside)
    return archive[:at] + bytes([archive[at] ^ 0xFF]) + archive[at + 1 :]


def _zip_method(archive: bytes, method: int) -> bytes:
    """`archive` claiming compression `method` for every member (local and central headers)."""
    data = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(signature)
        while at != -1:
            data[at + offset : at + offset + 2] = method.to_bytes(2, "little")
            at = data.find(signature, at + 4)
    return bytes(data)


def test_bad_adapter_archives_are_refused_and_nothing_is_stored(
    api: Api, registered: dict, tiny_adapter
) -> None:
    files = _adapter_files(tiny_adapter[0])
    before = api.stored()
    for case, (content, code) in _bad_archives(files).items():
        response = api.upload(content, "adapter", "bad.tar.gz")
        status = 413 if code == "payload_too_large" else 422
        body = problem(response, status, code)
        assert str(api.root) not in response.text, (case, body)
        assert api.keys["a"] not in response.text and "ten_" not in response.text, (case, body)
        assert api.stored() == before, case
    body = problem(
        api.upload(_bad_archives(files)["not LoRA"][0], "adapter", "bad.tgz"),
        422,
        "invalid_adapter",
    )
    assert body["field"] == "peft_type" and body["file"] == "adapter_config.json"


def test_only_the_adapter_is_kept_and_odd_harmless_names_are_skipped(
    api: Api, registered: dict, tiny_adapter
) -> None:
    files = _adapter_files(tiny_adapter[0])
    extras = {
        "a:b.txt": b"x",
        "README.md": b"# card",
        "__MACOSX/._x": b"junk",
        "notes\\a.txt": b"y",
    }
    upload = api.upload(_zip({**files, **extras}), "adapter", "odd.zip")
    assert upload.status_code == 201, upload.text
    details = upload.json()["details"]
    assert details["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert details["digest"] == registered["adapter"]["details"]["digest"]
    _, paths = api.stored()
    assert not [path for path in paths if path.endswith(("a:b.txt", "README.md"))], paths


def _multipart(purpose: str, content: bytes) -> tuple[bytes, str]:
    boundary = "fudlr-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return (
        head + content + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def test_an_upload_over_the_size_limit_is_refused(api: Api, registered: dict) -> None:
    before = api.stored()
    problem(
        api.upload(b"x" * (LIMIT + (128 << 10)), "train", "big.jsonl"), 413, "payload_too_large"
    )
    body, content_type = _multipart("train", b"x" * (LIMIT + (128 << 10)))
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length
    response = api.call("POST", "/v1/files", content=chunks, headers={"Content-Type": content_type})
    problem(response, 413, "payload_too_large")
    # just over the file limit, within the multipart slack: the copy into storage refuses it
    problem(api.upload(b"x" * (LIMIT + 1), "train", "big.jsonl"), 413, "payload_too_large")
    assert api.stored() == before


@pytest.mark.parametrize(
    ("purpose", "lines", "line", "field", "reason"),
    [
        (
            "items",
            ['{"item_id": "1", "title": "A"}', '{"item_id": "2", "title": "B"', ""],
            2,
            None,
            "not valid JSON",
        ),
        (
            "items",
            ['{"item_id": "1", "title": "A"}', '{"item_id": "2"}'],
            2,
            "title",
            "Field required",
        ),
        ("users", ['{"user_id": "1"}', '{"user_id": "1"}'], 2, "user_id", "duplicate user_id"),
        ("users", ['{"user_id": "1", "colour": "red"}'], 1, "colour", "Extra inputs"),
        (
            "train",
            [
                '{"sample_id": "s", "user_id": "1", "history": [""], "target": "1", '
                '"prompt": "p", "completion": "c"}'
            ],
            1,
            "history",
            "empty item id",
        ),
        ("valid", ["[1, 2]"], 1, None, "expected a JSON object"),
        ("items", ['{"item_id": "1", "title": ' + "[" * 20_000], 1, None, "not valid JSON"),
        (
            "items",
            ['{"item_id": "1", "title": "A", "n": 1' + "0" * 5000 + "}"],
            1,
            None,
            "not valid JSON",
        ),
        ("items", ['{"item_id": "1", "title": "A"}', " " * (LINE + 1)], 2, None, "longer than"),
    ],
)
def test_malformed_json_lines_name_the_line_and_field(
    api: Api, registered: dict, purpose, lines, line, field, reason
) -> None:
    before = api.stored()
    body = problem(
        api.upload("\n".join(lines).encode(), purpose, f"my-{purpose}.jsonl"), 422, "invalid_data"
    )
    assert (body["file"], body.get("line"), body.get("field")) == (
        f"my-{purpose}.jsonl",
        line,
        field,
    )
    assert reason in body["detail"]
    assert api.stored() == before


def test_empty_and_non_utf8_data_files_are_refused(api: Api, registered: dict) -> None:
    problem(api.upload(b"\n\n", "items", "blank.jsonl"), 422, "invalid_data")
    problem(api.upload(b"", "items", "empty.jsonl"), 422, "invalid_data")
    problem(
        api.upload(b'{"item_id": "\xff", "title": "x"}', "items", "latin.jsonl"),
        422,
        "invalid_data",
    )
    problem(
        api.call("POST", "/v1/files", data={"purpose": "weights"}, files={"file": ("x", b"x")}),
        422,
        "validation_error",
    )


@pytest.mark.parametrize(
    ("field", "change", "reason"),
    [
        (
            "history.0",
            lambda row: {**row, "history": ["no-such-item", *row["history"][1:]]},
            "unknown item 'no-such-item'",
        ),
        ("target", lambda row: {**row, "target": "no-such-item"}, "unknown item 'no-such-item'"),
        ("user_id", lambda row: {**row, "user_id": "no-such-user"}, "unknown user 'no-such-user'"),
    ],
)
def test_registration_refuses_unknown_items_and_users(
    api: Api, registered: dict, tiny_bundle: Path, field, change, reason
) -> None:
    rows = [json.loads(line) for line in (tiny_bundle / "train.jsonl").read_text().splitlines()]
    rows[2] = change(rows[2])
    upload = api.upload(
        "\n".join(json.dumps(r) for r in rows).encode(), "train", "edited-train.jsonl"
    )
    assert upload.status_code == 201, upload.text
    body = {**registered["body"], "data": {**registered["data"], "train": upload.json()["id"]}}
    with api.sessions()() as session:
        recommenders = session.scalar(select(func.count()).select_from(Version))
    before = api.stored()
    result = problem(api.call("POST", "/v1/recommenders", json=body), 422, "invalid_data")
    assert api.stored() == before
    assert result["file"] == "edited-train.jsonl" and result["file_id"] == upload.json()["id"]
    assert (result["line"], result["field"], result["detail"]) == (3, field, reason)
    with api.sessions()() as session:
        assert session.scalar(select(func.count()).select_from(Version)) == recommenders


def test_registration_refuses_wrong_purposes_and_adapters_for_another_model(
    api: Api, registered: dict, tmp_path_factory, tiny_adapter
) -> None:
    from fudlr.models.tiny import TinyModelConfig, build_tiny_model

    data = registered["data"]
    wrong = {**registered["body"], "data": {**data, "train": data["valid"]}}
    assert (
        problem(api.call("POST", "/v1/recommenders", json=wrong), 422, "wrong_purpose")["field"]
        == "data.train"
    )
    swapped = {**registered["body"], "adapter_file_id": data["items"]}
    problem(api.call("POST", "/v1/recommenders", json=swapped), 422, "wrong_purpose")

    other = tmp_path_factory.mktemp("other-model")
    build_tiny_model(other, TinyModelConfig(hidden_size=96, intermediate_size=192))
    base = api.ok("POST", "/v1/base-models", json={"name": "other", "path": str(other)})
    body = problem(
        api.call(
            "POST", "/v1/recommenders", json={**registered["body"], "base_model_id": base["id"]}
        ),
        422,
        "adapter_mismatch",
    )
    assert "lora_A" in body["field"] and "does not fit" in body["detail"]

    files = _adapter_files(tiny_adapter[0])
    config = json.loads(files["adapter_config.json"])
    odd = api.upload(
        _tar(
            {
                **files,
                "adapter_config.json": json.dumps(
                    {**config, "target_modules": ["q_proj", "nope_proj"]}
                ).encode(),
            }
        ),
        "adapter",
        "odd.tgz",
    )
    assert odd.status_code == 201, odd.text
    body = problem(
        api.call(
            "POST",
            "/v1/recommenders",
            json={**registered["body"], "adapter_file_id": odd.json()["id"]},
        ),
        422,
        "adapter_mismatch",
    )
    assert body["field"] == "target_modules" and "nope_proj" in body["detail"]


def test_base_model_registration_refusals(api: Api, tiny_model: Path, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("models")
    pickled = root / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    remote = root / "remote"
    shutil.copytree(tiny_model, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    cases = [
        ({"path": str(pickled)}, "pickled weights are refused", None),
        ({"path": str(remote)}, "remote code", None),
        ({"path": "relative/dir"}, "absolute", "path"),
        ({"path": str(root / "missing")}, "under this server's model roots", "path"),
        ({"path": str(tiny_model), "sha256": "0" * 64}, "not the expected", "sha256"),
    ]
    for fields, reason, field in cases:
        body = problem(
            api.call("POST", "/v1/base-models", json={"name": "m", **fields}),
            422,
            "invalid_base_model",
        )
        assert reason in body["detail"] and body.get("field") == field, body
    # outside the roots, every path gets the same answer: no oracle for the server's files
    loop = root / "loop"
    loop.symlink_to(loop)
    outside = ["/etc", "/nonexistent", "/usr/lib", str(loop), str(root / ("x" * 300)), "/proc/1"]
    answers = set()
    for path in outside:
        response = api.call("POST", "/v1/base-models", json={"name": "m", "path": path})
        body = problem(response, 422, "invalid_base_model")
        answers.add((body["detail"], body["field"]))
    assert answers == {("not a model directory under this server's model roots", "path")}
    body = problem(
        api.call("POST", "/v1/base-models", json={"name": "m", "path": "/tmp/a\x00b"}),
        422,
        "validation_error",
    )
    assert body["field"] == "path" and "NUL" in body["detail"]
    good = api.ok("POST", "/v1/base-models", json={"name": "m", "path": str(tiny_model)})
    again = api.ok(
        "POST",
        "/v1/base-models",
        json={"name": "m", "path": str(tiny_model), "sha256": good["digest"]},
    )
    assert again["digest"] == good["digest"] and good["details"]["model_type"] == "llama"


def test_job_refusals(api: Api, registered: dict, ready: str) -> None:
    indexing = registered["rec"]["id"]
    body = problem(
        api.call("POST", "/v1/jobs", json={"recommender_id": indexing, "biases": [BIAS]}),
        409,
        "version_not_ready",
    )
    assert "indexing" in body["detail"]
    cases = [
        (
            {"biases": [{**BIAS, "attribute": "colour"}]},
            422,
            "invalid_bias",
            "biases.0",
            "no item has the attribute 'colour'",
        ),
        (
            {
                "biases": [
                    BIAS,
                    {**BIAS, "side": "user", "attribute": "shoe_size", "metric": "NDCG"},
                ]
            },
            422,
            "invalid_bias",
            "biases.1",
            "shoe_size",
        ),
        (
            {"biases": [{**BIAS, "k": 999}]},
            422,
            "invalid_bias",
            "biases.0",
            "larger than the catalog",
        ),
        (
            {"biases": [{**BIAS, "metric": "NDCG"}]},
            422,
            "validation_error",
            "biases.0",
            "metric must be one of MGU, DGU",
        ),
        ({"biases": [BIAS, BIAS]}, 422, "validation_error", "biases", "given twice"),
        ({"biases": []}, 422, "validation_error", "biases", "at least 1"),
        (
            {"biases": [BIAS], "options": {"step_sizes": [0]}},
            422,
            "validation_error",
            "options.step_sizes",
            "(0, 4]",
        ),
        (
            {"biases": [BIAS], "budget": {"max_fraction": 2}},
            422,
            "validation_error",
            "budget.max_fraction",
            "less than or equal",
        ),
        (
            {"biases": [BIAS], "budget": {"max_upweight": -1}},
            422,
            "validation_error",
            "budget.max_upweight",
            "greater than or equal",
        ),
        (
            {"biases": [BIAS], "budget": {"max_other_k_increase": -0.5}},
            422,
            "validation_error",
            "budget.max_other_k_increase",
            "greater than or equal",
        ),
        (
            {"biases": [BIAS], "options": {"random_control": "maybe"}},
            422,
            "validation_error",
            "options.random_control",
            "'require'",
        ),
        (
            {"biases": [BIAS], "options": {"decoding": "sampled"}},
            422,
            "validation_error",
            "options.decoding",
            "'constrained'",
        ),
        ({"biases": [BIAS], "surprise": 1}, 422, "validation_error", "surprise", "Extra inputs"),
        ({"biases": [BIAS], "version": 7}, 404, "not_found", None, "version"),
    ]
    with api.sessions()() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
    for fields, status, code, field, reason in cases:
        result = problem(
            api.call("POST", "/v1/jobs", json={"recommender_id": ready, **fields}), status, code
        )
        assert result.get("field") == field and reason in result["detail"], result
    with api.sessions()() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs


def test_every_job_setting_out_of_bounds_is_a_422_naming_it(api: Api, ready: str) -> None:
    """Read from the settings' declarations: a new bounded setting is checked here too."""
    with api.sessions()() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
    for group, model in (("budget", Budget), ("options", Options)):
        for name in model.model_fields:
            for value in out_of_bounds(SETTINGS[name].setting):
                body = {"recommender_id": ready, "biases": [BIAS], group: {name: value}}
                refused = problem(api.call("POST", "/v1/jobs", json=body), 422, "validation_error")
                assert refused["field"] == f"{group}.{name}", refused
    with api.sessions()() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs


def test_a_job_expecting_another_index_projection_is_refused(api: Api, ready: str) -> None:
    with api.sessions()() as session:
        version = session.scalar(select(Version).where(Version.recommender_id == ready))
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "a"))
    index = api.root / "artifacts" / "tenants" / tenant_id / "indexes" / version.id
    index.mkdir(parents=True)
    (index / "index.json").write_text(json.dumps({"projection": {"kind": "eigenbasis"}}))
    body = {"recommender_id": ready, "biases": [BIAS]}
    refused = problem(
        api.call("POST", "/v1/jobs", json={**body, "options": {"projection": "dense"}}),
        422,
        "index_mismatch",
    )
    assert refused["field"] == "options.projection"
    assert "stores eigenbasis gradients" in refused["detail"], refused
    accepted = api.ok("POST", "/v1/jobs", json={**body, "options": {"projection": "eigenbasis"}})
    assert accepted["spec"]["options"]["projection"] == "eigenbasis"


def test_a_bias_the_guard_users_cannot_measure_is_refused_at_submission(
    api: Api, ready: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No tiny validation history holds a Mystery film: a genres bias has a group with no
    share of the histories to be fair to (field biases.N, N its place in the request)."""
    genres = {**BIAS, "attribute": "genres"}
    body = {"recommender_id": ready, "biases": [BIAS, genres]}
    with api.sessions()() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
    refused = problem(api.call("POST", "/v1/jobs", json=body), 422, "unmeasurable_bias")
    assert refused["field"] == "biases.1", refused
    assert refused["detail"].startswith(
        "bias item:genres:MGU@5 cannot be measured: item group(s) Mystery are absent"
    ), refused
    alone = {"recommender_id": ready, "biases": [genres], "options": {"drop_unmeasurable": True}}
    refused = problem(api.call("POST", "/v1/jobs", json=alone), 422, "unmeasurable_bias")
    assert refused["field"] == "biases.0" and "no other bias is left" in refused["detail"]
    with api.sessions()() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs
    kept = api.ok("POST", "/v1/jobs", json={**body, "options": {"drop_unmeasurable": True}})
    assert kept["state"] == "queued" and kept["spec"]["options"]["drop_unmeasurable"] is True
    assert kept["spec"]["budget"]["accuracy_k"] == 10  # NDCG@10, whatever the biases' K
    too_deep = {**body, "biases": [BIAS], "budget": {"accuracy_k": 31}}  # 30 tiny items
    refused = problem(api.call("POST", "/v1/jobs", json=too_deep), 422, "validation_error")
    assert (
        refused["field"] == "budget.accuracy_k" and "larger than the catalog" in refused["detail"]
    )

    # the CLI: one line naming the bias and why, exit 2; with the flag, the job is queued
    monkeypatch.setenv("FUDLR_URL", api.server.url)
    monkeypatch.setenv("FUDLR_API_KEY", api.keys["a"])
    args = ["submit", ready, "--bias", "item:popularity_group:MGU@5", "--bias", "item:genres:MGU@5"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: unmeasurable_bias (422): field 'biases.1': bias item:genres:MGU@5 cannot be "
        "measured: item group(s) Mystery are absent"
    ), lines
    code, out, _ = run_cli([*args, "--drop-unmeasurable", "--accuracy-k", "5"], capsys)
    assert code == 0 and out.strip().startswith("job_")
    spec = api.ok("GET", f"/v1/jobs/{out.strip()}")["spec"]
    assert spec["options"]["drop_unmeasurable"] is True and spec["budget"]["accuracy_k"] == 5


def test_a_recommender_keeps_its_decoding_and_jobs_inherit_it(
    api: Api, registered: dict, tiny_bundle: Path, tmp_path: Path
) -> None:
    assert registered["rec"]["decoding"] == "constrained"  # the default
    body = {**registered["body"], "name": "grounded", "decoding": "grounded"}
    grounded = api.ok("POST", "/v1/recommenders", json=body)
    assert api.ok("GET", f"/v1/recommenders/{grounded['id']}")["decoding"] == "grounded"
    with api.sessions().begin() as session:
        session.execute(
            update(Version).where(Version.recommender_id == grounded["id"]).values(state="ready")
        )
    inherited = api.ok(
        "POST", "/v1/jobs", json={"recommender_id": grounded["id"], "biases": [BIAS]}
    )
    assert inherited["spec"]["options"]["decoding"] == "grounded"
    chosen = api.ok(
        "POST",
        "/v1/jobs",
        json={
            "recommender_id": grounded["id"],
            "biases": [BIAS],
            "options": {"decoding": "constrained"},
        },
    )
    assert chosen["spec"]["options"]["decoding"] == "constrained"
    # lists longer than the items a user can get: refused at submission, nothing queued
    catalog = len(Bundle.load(tiny_bundle, splits=()).items)
    refused = problem(
        api.call(
            "POST",
            "/v1/jobs",
            json={
                "recommender_id": grounded["id"],
                "biases": [{**BIAS, "k": catalog - 1}],
                "options": {"decoding": "constrained"},
            },
        ),
        422,
        "not_decodable",
    )
    assert refused["field"] == "options.decoding" and "cannot be filled" in refused["detail"]

    with api.sessions()() as session:
        recommenders = session.scalar(select(func.count()).select_from(Recommender))
    twins = twin_titles_bundle(tiny_bundle, tmp_path / "twins")
    twin_data = {
        purpose: api.upload(
            (twins / f"{purpose}.jsonl").read_bytes(), purpose, f"twin-{purpose}.jsonl"
        ).json()["id"]
        for purpose in ("items", "users", "train", "valid", "test")
    }
    twin_body = {**registered["body"], "name": "twins", "data": twin_data}
    refused = problem(api.call("POST", "/v1/recommenders", json=twin_body), 422, "invalid_data")
    assert (refused["file"], refused["field"]) == ("twin-items.jsonl", "title")
    assert "share the title" in refused["detail"]
    refused = problem(
        api.call("POST", "/v1/recommenders", json={**body, "decoding": "beam"}),
        422,
        "validation_error",
    )
    assert refused["field"] == "decoding" and "'grounded'" in refused["detail"]
    with api.sessions()() as session:
        assert session.scalar(select(func.count()).select_from(Recommender)) == recommenders
    grounded_twins = api.ok("POST", "/v1/recommenders", json={**twin_body, "decoding": "grounded"})
    assert grounded_twins["decoding"] == "grounded"  # grounding ranks both twins


def test_idempotency_keys(api: Api, ready: str) -> None:
    body = {"recommender_id": ready, "biases": [BIAS], "budget": {"max_fraction": 0.1}}
    key = {"Idempotency-Key": "submit-once"}
    first = api.call("POST", "/v1/jobs", json=body, headers=dict(key))
    again = api.call("POST", "/v1/jobs", json=body, headers=dict(key))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert (
        first.headers["location"] == again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    )
    conflict = problem(
        api.call(
            "POST", "/v1/jobs", json={**body, "budget": {"max_fraction": 0.3}}, headers=dict(key)
        ),
        422,
        "idempotency_conflict",
    )
    assert conflict["job_id"] == first.json()["id"]
    other_tenant = api.call("POST", "/v1/jobs", "b", json=body, headers=dict(key))
    assert other_tenant.status_code == 404  # keys are per tenant; b cannot see a's recommender
    fresh = [api.ok("POST", "/v1/jobs", json=body)["id"] for _ in range(2)]
    assert len({first.json()["id"], *fresh}) == 3


def test_cancel_pagination_events_and_reports(api: Api, ready: str) -> None:
    jobs = [
        api.ok("POST", "/v1/jobs", json={"recommender_id": ready, "biases": [{**BIAS, "k": k}]})
        for k in (1, 2, 3)
    ]
    assert all(job["state"] == "queued" and job["stage"] is None for job in jobs)
    cancelled = api.ok("POST", f"/v1/jobs/{jobs[0]['id']}/cancel")
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"] is not None
    body = problem(api.call("POST", f"/v1/jobs/{jobs[0]['id']}/cancel"), 409, "job_finished")
    assert "already cancelled" in body["detail"]
    problem(api.call("GET", f"/v1/jobs/{jobs[0]['id']}/report"), 409, "report_unavailable")
    with api.sessions().begin() as session:  # as a worker would leave a finished job
        session.execute(update(Job).where(Job.id == jobs[1]["id"]).values(state="succeeded"))
    problem(api.call("POST", f"/v1/jobs/{jobs[1]['id']}/cancel"), 409, "job_finished")

    events = api.ok("GET", f"/v1/jobs/{jobs[0]['id']}/events")
    assert [e["message"] for e in events["data"]] == [
        "queued on version 1",
        "cancelled before it started",
    ]
    later = api.ok(
        "GET", f"/v1/jobs/{jobs[0]['id']}/events", params={"after": events["data"][0]["id"]}
    )
    assert [e["id"] for e in later["data"]] == [events["last_id"]]

    seen, cursor = [], None
    while True:
        page = api.ok(
            "GET",
            "/v1/jobs",
            params={"recommender_id": ready, "limit": 2, **({"cursor": cursor} if cursor else {})},
        )
        assert len(page["data"]) <= 2
        seen += [job["id"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and {job["id"] for job in jobs} <= set(seen)
    created = [api.ok("GET", f"/v1/jobs/{job_id}")["created_at"] for job_id in seen]
    assert created == sorted(created, reverse=True)
    by_state = api.ok("GET", "/v1/jobs", params={"state": "cancelled"})["data"]
    assert jobs[0]["id"] in {job["id"] for job in by_state}
    assert {job["state"] for job in by_state} == {"cancelled"}
    assert jobs[2]["id"] not in {job["id"] for job in by_state}
    problem(api.call("GET", "/v1/jobs", params={"cursor": "garbage"}), 422, "validation_error")
    problem(api.call("GET", "/v1/jobs", params={"state": "sleeping"}), 422, "validation_error")


def test_metrics(api: Api, ready: str) -> None:
    api.ok("POST", "/v1/jobs", json={"recommender_id": ready, "biases": [BIAS]})
    text = httpx.get(api.server.url + "/metrics").text
    with api.sessions()() as session:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        versions = dict(
            session.execute(select(Version.state, func.count()).group_by(Version.state)).all()
        )
    assert jobs["queued"] >= 1 and versions["ready"] >= 1
    for state in ("queued", "running", "succeeded", "failed", "cancelling", "cancelled"):
        assert f'fudlr_jobs{{state="{state}"}} {float(jobs.get(state, 0))}' in text
    assert f'fudlr_versions{{state="ready"}} {float(versions["ready"])}' in text
    assert 'fudlr_queue_depth{queue="gpu"}' in text  # filesystem broker: no worker consumes
    assert "fudlr_job_duration_seconds_bucket" in text
    assert 'fudlr_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text


def test_a_recommender_without_a_test_split(api: Api, registered: dict) -> None:
    data = {k: v for k, v in registered["data"].items() if k != "test"}
    rec = api.ok("POST", "/v1/recommenders", json={**registered["body"], "data": data})
    assert rec["data"] == data
    with api.sessions().begin() as session:
        session.execute(
            update(Version).where(Version.recommender_id == rec["id"]).values(state="ready")
        )
    job = api.ok("POST", "/v1/jobs", json={"recommender_id": rec["id"], "biases": [BIAS]})
    assert job["spec"]["options"]["test_users"] == 0  # nothing to measure on
    body = {"recommender_id": rec["id"], "biases": [BIAS], "options": {"test_users": 5}}
    refused = problem(api.call("POST", "/v1/jobs", json=body), 422, "validation_error")
    assert refused["field"] == "options.test_users"


def test_readiness_fails_when_the_broker_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with InProcessServer(settings) as server:
        response = httpx.get(server.url + "/readyz", timeout=30)
        body = problem(response, 503, "not_ready")
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["broker"].startswith("unreachable")
        assert httpx.get(server.url + "/healthz").status_code == 200
