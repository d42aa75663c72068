"""LoRA adapters: how they are configured, attached, saved and loaded (stock PEFT format)."""

from __future__ import annotations

import json
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


def check_adapter_fits(model: PreTrainedModel, adapter_dir: Path) -> dict:
    """Refuse an adapter whose target modules the base model does not have, before any compute."""
    config = read_adapter_config(adapter_dir)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - module_names)
    if missing:
        raise InputError(
            f"adapter targets modules the base model lacks: {', '.join(missing)}",
            file=adapter_dir / ADAPTER_CONFIG,
            field="target_modules",
        )
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
