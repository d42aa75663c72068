"""LoRA adapters: how they are configured, attached, saved and loaded (stock PEFT format)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fudlr.errors import InputError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters of a new adapter.

    rank: r of the low-rank update; alpha: scaling numerator (update scaled by alpha/r);
    dropout: on the LoRA input during training; target_modules: linear layers adapted;
    top_layers: adapt only the last N transformer layers (None = all). Backpropagation
    then stops at the lowest adapted layer, so training, indexing and every gradient
    the repair takes cost less.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    top_layers: int | None = None

    def to_peft(self, num_layers: int):
        from peft import LoraConfig, TaskType

        layers = None
        if self.top_layers is not None:
            if not 1 <= self.top_layers <= num_layers:
                raise InputError(
                    f"top_layers must be between 1 and the model's {num_layers} layers, "
                    f"got {self.top_layers}",
                    field="top_layers",
                )
            layers = list(range(num_layers - self.top_layers, num_layers))
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=layers,
            bias="none",
        )

    def describe(self) -> dict:
        return asdict(self)


def attach_new_adapter(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    from peft import get_peft_model

    return get_peft_model(model, settings.to_peft(model.config.num_hidden_layers))


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise InputError(
            "not a PEFT adapter directory (adapter_config.json missing)", file=adapter_dir
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON ({error.msg})", file=path, line=error.lineno) from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InputError("only LoRA adapters are supported", file=path, field="peft_type")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"{ADAPTER_WEIGHTS} missing (safetensors only)", file=adapter_dir)
    return config


def target_matches(targets: str | Collection[str], name: str) -> bool:
    """PEFT's rule (peft's `check_target_module_exists`) for a module's full name: a string
    is a regular expression the name must match whole; a list names modules by their full
    name or by a '.'-suffix ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def check_targets(targets: object, modules: Iterable[str], file: str | Path) -> None:
    """Refuse target_modules (an adapter config's) that name a module the base model lacks:
    a string matching none of its modules, or a listed name matching none (stricter than
    PEFT, which wants one match overall: a name that matches nothing means the adapter was
    made for another model). Torch-free: the service checks uploads with it."""
    names = list(modules)
    if isinstance(targets, str):
        try:
            found = any(target_matches(targets, name) for name in names)
        except re.error as error:
            raise InputError(
                f"target_modules is not a valid regular expression ({error})",
                file=file,
                field="target_modules",
            ) from None
        if not found:
            raise InputError(
                f"target_modules '{targets}' matches no module of the base model",
                file=file,
                field="target_modules",
            )
        return
    listed = set(targets) if isinstance(targets, list) else set()
    missing = [
        target
        for target in sorted(listed)
        if not any(target_matches([target], name) for name in names)
    ]
    if missing:
        raise InputError(
            f"target_modules names modules the base model lacks: {', '.join(missing)}",
            file=file,
            field="target_modules",
        )


def check_adapter_fits(model: PreTrainedModel, adapter_dir: Path) -> dict:
    """Refuse an adapter whose target modules the base model does not have, before any compute."""
    config = read_adapter_config(adapter_dir)
    modules = (name for name, _ in model.named_modules())
    check_targets(config.get("target_modules"), modules, adapter_dir / ADAPTER_CONFIG)
    return config


def load_adapter(
    model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False
) -> PeftModel:
    """Wrap `model` with the adapter through stock `PeftModel.from_pretrained`, in eval mode."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_fits(model, adapter_dir)
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except RuntimeError as error:
        # size mismatches (adapter trained on another base model) surface as RuntimeError
        first_line = str(error).strip().splitlines()[-1][:300]
        raise InputError(
            f"adapter does not fit the base model: {first_line}", file=adapter_dir
        ) from None
    # evaluation mode even when trainable: gradients are wanted, LoRA dropout is not
    return wrapped.eval()


def base_model_only(model: PreTrainedModel | PeftModel) -> AbstractContextManager:
    """Run a PEFT-wrapped model as its base model inside the block (a no-op for a bare one)."""
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
