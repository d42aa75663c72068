"""Registering a base model: a local safetensors directory, pinned by its weights' sha256.

Only what can be read as data is accepted: safetensors weights (pickled ones are
refused), a tokenizer, and a config that asks for no remote code. Workers check the
digest again before every task, so a directory changed after registration is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from fudlr.errors import InputError
from fudlr.models.store import weight_files, weights_digest
from service.base_models.models import RegisteredModel
from service.base_models.schemas import BaseModelCreate
from service.db import new_id
from service.files.tensors import read_header
from service.problems import Problem, input_problem
from service.settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def register_base_model(
    session: Session, settings: Settings, tenant: str, request: BaseModelCreate
) -> RegisteredModel:
    directory = _allowed(settings, request.path)
    try:
        details = inspect_model(directory)
        digest = weights_digest(directory)
    except InputError as error:
        raise input_problem(error, "invalid_base_model") from None
    if request.sha256 is not None and request.sha256 != digest:
        raise Problem(
            422,
            "invalid_base_model",
            f"the weights' sha256 is {digest}, not the expected {request.sha256}",
            field="sha256",
        )
    record = RegisteredModel(
        id=new_id("bm"),
        tenant_id=tenant,
        name=request.name,
        path=str(directory),
        digest=digest,
        details=details,
    )
    session.add(record)
    session.commit()
    return record


def _allowed(settings: Settings, path: str) -> Path:
    """The model directory `path` names, if it lies within the server's model roots.

    Anything else (outside the roots, missing, not a folder, a link loop, a name the file
    system refuses) gets one identical answer: a client learns nothing about the server's
    files outside the roots.
    """
    if not Path(path).is_absolute():
        raise Problem(422, "invalid_base_model", "the path must be absolute", field="path")
    refused = Problem(
        422,
        "invalid_base_model",
        "not a model directory under this server's model roots",
        field="path",
    )
    try:
        directory = Path(path).resolve(strict=True)
        inside = any(directory.is_relative_to(root) for root in _resolved(settings.roots))
        if not inside or not directory.is_dir():
            raise refused
    except (OSError, RuntimeError, ValueError):  # missing, a loop, a name too long, a NUL
        raise refused from None
    return directory


def _resolved(roots: list[Path]) -> list[Path]:
    """The roots as real paths (a root that does not exist yet serves nothing)."""
    real = []
    for root in roots:
        try:
            real.append(root.resolve(strict=True))
        except (OSError, RuntimeError):
            continue
    return real


def inspect_model(directory: Path) -> dict[str, Any]:
    """What the model is, from its files alone (no torch, no code from the directory)."""
    config = _json(directory / "config.json")
    tokenizer = directory / "tokenizer_config.json"
    for name, data in (("config.json", config), (tokenizer.name, _json(tokenizer, {}))):
        if "auto_map" in data:
            raise InputError("needs remote code (auto_map); it is never run", file=name)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"no tokenizer ({', '.join(TOKENIZER_FILES)})", file=directory)
    names = weight_files(directory)
    tensors = {}
    for name in names:
        tensors.update(read_header(directory / name))
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "weight_files": names,
        "tensors": len(tensors),
        "bytes": sum((directory / name).stat().st_size for name in names),
    }


def _json(path: Path, missing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object in `path`; `missing` if given and the file is absent, else an error."""
    if not path.is_file():
        if missing is not None:
            return missing
        raise InputError("missing", file=path.name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("not valid JSON", file=path.name) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", file=path.name)
    return data
