"""Base-model directories: a Hugging Face safetensors model + tokenizer + a FUDLR manifest.

The manifest (`fudlr-model.json`) pins the weights by sha256 so that an index, an
adapter or a service registration can tell whether it still talks about the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fudlr.errors import InputError
from fudlr.hashing import file_sha256, files_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "fudlr-model.json"
_REFUSED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


@dataclass(frozen=True)
class ModelManifest:
    """What was converted or built, from what, and the digest of its weights."""

    name: str
    digest: str
    files: dict[str, str]
    source: dict[str, Any]

    def write(self, directory: Path) -> None:
        payload = {
            "name": self.name,
            "digest": self.digest,
            "files": self.files,
            "source": self.source,
        }
        (directory / MANIFEST).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a model directory; pickled weights are refused, never loaded."""
    for pattern in _REFUSED_WEIGHTS:
        unsafe = sorted(directory.glob(pattern))
        if unsafe:
            raise InputError(
                "pickled weights are refused; provide safetensors only", file=unsafe[0]
            )
    names = sorted(path.name for path in directory.glob("*.safetensors"))
    if not names:
        raise InputError("no *.safetensors weights in the model directory", file=directory)
    return names


def weights_digest(directory: Path) -> str:
    return files_sha256(directory, weight_files(directory))


def write_manifest(directory: Path, name: str, source: dict[str, Any]) -> ModelManifest:
    names = weight_files(directory)
    manifest = ModelManifest(
        name=name,
        digest=files_sha256(directory, names),
        files={file: file_sha256(directory / file) for file in names},
        source=source,
    )
    manifest.write(directory)
    return manifest


def read_manifest(directory: Path) -> ModelManifest | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return ModelManifest(
        name=data["name"], digest=data["digest"], files=data["files"], source=data["source"]
    )


def manifest_is_current(directory: Path) -> bool:
    """True when the manifest exists and every weight file still has its recorded hash."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    return all(
        (directory / name).is_file() and file_sha256(directory / name) == digest
        for name, digest in manifest.files.items()
    )


def model_digest(directory: str | Path) -> str:
    """The recorded digest when a manifest exists, else one computed from the weights."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return manifest.digest if manifest else weights_digest(directory)


def quiet_transformers() -> None:
    """Our own bars show progress; transformers' per-tensor bars are noise in logs."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM from local safetensors only: no hub access, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise InputError("not a model directory (config.json missing)", file=directory)
    weight_files(directory)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    model.to(device)
    model.eval()
    return model, load_tokenizer(directory)
