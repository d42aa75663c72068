"""Uploads: streamed to staging with a size cap, validated whole, only then stored and recorded.

A data file must parse as the bundle's JSON Lines schema for its purpose, line by line
(each line bounded in length); an adapter must be a safe archive of a LoRA PEFT directory
with safetensors weights, of which only the config and the weights are kept. A refused
upload leaves nothing behind: staging is removed, no row is written. Deleting a file
removes what no other file or version of the tenant still holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from fudlr.data.jsonl import iter_rows
from fudlr.data.schema import ROW_SCHEMAS
from fudlr.errors import InputError
from fudlr.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from service.auth.models import Tenant
from service.auth.service import owned
from service.db import new_id
from service.files.archives import Limits, pack, unpack
from service.files.models import File
from service.files.tensors import read_header
from service.problems import Problem, input_problem
from service.recommenders.service import kept_digests, users_of
from service.settings import Settings
from service.storage import TenantStore, size_of
from service.usage.service import require_room
from service.validation import INT32_MAX

ROW_KEYS = {"items": "item_id", "users": "user_id"}  # samples are keyed by sample_id
_CHUNK = 1 << 20
_MAX_CONFIG = 1 << 20  # an adapter_config.json is a few hundred bytes


def clean_filename(name: str | None) -> str:
    """The client's file name without folders or control characters (shown back in errors)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or "upload"


def create_file(
    session: Session,
    settings: Settings,
    store: TenantStore,
    tenant: str,
    purpose: str,
    filename: str,
    source: IO[bytes],
) -> File:
    """Receive and validate in staging; then, under the tenant's lock, check the byte quota
    against what is new to the store, move it into place and record it."""
    with store.staging() as staging:
        raw = staging / "upload"
        sha256, size = _receive(source, raw, settings.max_upload_bytes)
        if purpose == "adapter":
            details = _check_adapter(raw, staging, settings, filename)
            staged = [staging / "adapter.tar.gz", staging / "adapter"]  # as store.content
        else:
            details = {"rows": _check_rows(raw, purpose, filename, settings.max_line_bytes)}
            staged = [raw]
        record = File(
            id=new_id("file"),
            tenant_id=tenant,
            purpose=purpose,
            filename=filename,
            bytes=size,
            sha256=sha256,
            details=details,
        )
        targets = dict(zip(staged, store.content(record.digest), strict=False))
        Tenant.lock(session, tenant)
        new = {path: target for path, target in targets.items() if not target.exists()}
        require_room(store, settings, size_of(new))
        for path, target in new.items():
            store.put(path, target)
        session.add(record)
        session.commit()
    return record


def delete_file(session: Session, store: TenantStore, tenant: str, file_id: str) -> None:
    """Forget the file and remove what only it kept (content-addressed: another file or a
    version may hold the same bytes). 409 while a recommender uses it."""
    Tenant.lock(session, tenant)
    record = owned(session, File, file_id, tenant, "file")
    users = users_of(session, tenant, record.id)
    if users:
        raise Problem(
            409,
            "in_use",
            f"file '{record.id}' is used by recommender {', '.join(users)}; delete "
            f"{'it' if len(users) == 1 else 'them'} first",
        )
    session.delete(record)
    session.flush()
    held = record.digest in kept_digests(session, tenant)
    with store.removing(record.id, [] if held else store.content(record.digest)):
        session.commit()


def _receive(source: IO[bytes], target: Path, limit: int) -> tuple[str, int]:
    hasher, size = hashlib.sha256(), 0
    with target.open("wb") as handle:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise Problem(413, "payload_too_large", f"the upload exceeds {limit} bytes")
            hasher.update(chunk)
            handle.write(chunk)
    if size == 0:
        raise Problem(422, "invalid_data", "the upload is empty")
    return hasher.hexdigest(), size


def _check_rows(path: Path, purpose: str, filename: str, max_line_bytes: int) -> int:
    """Every line against its schema, ids unique; the error names the line and the field."""
    key = ROW_KEYS.get(purpose, "sample_id")
    seen: set[str] = set()
    try:
        for line, row in iter_rows(path, ROW_SCHEMAS[purpose], max_line_bytes):
            value = getattr(row, key)
            if value in seen:
                raise InputError(f"duplicate {key} '{value}'", file=path, line=line, field=key)
            seen.add(value)
    except InputError as error:
        raise input_problem(error, names={str(path): {"file": filename}}) from None
    except UnicodeDecodeError:
        raise Problem(422, "invalid_data", "not UTF-8 text", file=filename) from None
    if not seen:
        raise Problem(422, "invalid_data", "the file has no rows", file=filename)
    return len(seen)


def _check_adapter(raw: Path, staging: Path, settings: Settings, filename: str) -> dict[str, Any]:
    """Unpack safely into `staging/adapter`, check it is a LoRA adapter, and pack the
    canonical archive `staging/adapter.tar.gz`, whose digest versions and downloads are
    known by."""
    folder = staging / "adapter"
    folder.mkdir()
    limits = Limits(settings.max_archive_members, settings.max_extracted_bytes)
    files = unpack(raw, folder, limits)
    try:
        _check_config(folder / ADAPTER_CONFIG)
        config = read_adapter_config(folder)
        tensors = read_header(folder / ADAPTER_WEIGHTS)
        lora = [name for name in tensors if ".lora_A." in name or ".lora_B." in name]
        if not lora:
            raise InputError("holds no LoRA tensors (lora_A / lora_B)", file=ADAPTER_WEIGHTS)
    except InputError as error:
        raise input_problem(error, "invalid_adapter", {str(folder): {"file": filename}}) from None
    digest = pack(folder, staging / "adapter.tar.gz")
    return {
        "digest": digest,
        "files": files,
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "lora_tensors": len(lora),
    }


class _AdapterConfig(BaseModel):
    """The fields of `adapter_config.json` the service reads and shows, with their types."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    peft_type: str | None = None
    r: int | None = Field(None, ge=1, le=INT32_MAX)
    lora_alpha: int | float | None = None
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None


def _check_config(path: Path) -> None:
    """The config must be a small JSON object whose fields have PEFT's types, before the
    method reads it (it assumes as much)."""
    if not path.is_file():
        return  # read_adapter_config says what is missing
    if path.stat().st_size > _MAX_CONFIG:
        raise InputError(f"larger than {_MAX_CONFIG} bytes", file=path)
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # malformed, not UTF-8, too deep, too many digits
        raise InputError("not valid JSON", file=path) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", file=path)
    try:
        _AdapterConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InputError(first["msg"], file=path, field=field) from None
