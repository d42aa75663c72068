"""Does an adapter fit a base model? Answered from safetensors headers, before any compute.

Each LoRA pair adapts one linear layer `W [out, in]` of the base model with
`lora_A [r, in]` and `lora_B [out, r]`: the layer must exist and the shapes must agree,
and every target module the adapter's config names must exist in the base model.
"""

from __future__ import annotations

import re
from pathlib import Path

from fudlr.errors import InputError
from fudlr.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_targets, read_adapter_config
from fudlr.models.store import weight_files
from service.files.tensors import read_header

_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def check_fit(base_dir: Path, adapter_dir: Path) -> None:
    """Raise InputError (field and reason) unless every LoRA pair fits a base-model layer."""
    config = read_adapter_config(adapter_dir)
    base: dict[str, tuple[int, ...]] = {}
    for name in weight_files(base_dir):
        base.update({key: shape for key, (_, shape) in read_header(base_dir / name).items()})
    modules = {key.removesuffix(".weight") for key in base if key.endswith(".weight")}
    check_targets(config.get("target_modules"), modules, ADAPTER_CONFIG)
    for key, (_, shape) in read_header(adapter_dir / ADAPTER_WEIGHTS).items():
        match = _LORA.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            continue
        module = match["module"]
        if f"{module}.weight" not in base:
            raise InputError(
                f"adapts '{module}', which the base model does not have",
                file=ADAPTER_WEIGHTS,
                field=key,
            )
        out_features, in_features = base[f"{module}.weight"][:2]
        wanted = in_features if match["part"] == "A" else out_features
        got = shape[1] if match["part"] == "A" else shape[0]
        if len(shape) != 2 or got != wanted:
            raise InputError(
                f"shape {list(shape)} does not fit the base model's '{module}' "
                f"[{out_features}, {in_features}]: trained on another base model?",
                file=ADAPTER_WEIGHTS,
                field=key,
            )
