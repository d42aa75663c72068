"""Stage 2: remove the selected samples' influence from the LoRA weights with one Newton step.

Δθ = (1/n) H⁻¹ Σ_i m_i ∇ℓ_i(θ): the first-order change of the optimum when the samples'
weights in the mean training loss drop by m_i (removal moves *along* H⁻¹∇ℓ). The patched
adapter keeps the original adapter_config.json byte for byte; only LoRA tensors change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fudlr.influence.curvature import Curvature
from fudlr.influence.layout import ParameterLayout
from fudlr.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

REPAIR_MANIFEST = "fudlr-repair.json"


def newton_step(
    gradient_sum: torch.Tensor, curvature: Curvature, layout: ParameterLayout, samples: int
) -> dict[str, torch.Tensor]:
    """(1/n) H⁻¹ Σ m_i ∇ℓ_i per LoRA weight, from the flat weighted gradient sum."""
    per_layer = layout.unflatten(gradient_sum.float() / samples)
    return curvature.precondition(per_layer)


class WeightPatcher:
    """Moves a loaded PEFT model's LoRA weights to θ0 + η·Δθ, any number of times."""

    def __init__(self, model: torch.nn.Module, step: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        self.parameters = {name: named[name] for name in step}
        self.original = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.step = step

    @torch.no_grad()
    def apply(self, eta: float) -> None:
        for name, parameter in self.parameters.items():
            update = self.step[name].to(parameter.device, parameter.dtype)
            parameter.copy_(self.original[name] + eta * update)

    def restore(self) -> None:
        self.apply(0.0)


def save_patched_adapter(
    model: torch.nn.Module, original_dir: Path, out_dir: Path, provenance: dict
) -> None:
    """Write the model's current LoRA tensors next to the original adapter_config.json."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(original_dir / ADAPTER_CONFIG, staging / ADAPTER_CONFIG)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (staging / REPAIR_MANIFEST).write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
