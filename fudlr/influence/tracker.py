"""Hooks on PEFT's LoRA linears that yield per-sample gradients of the LoRA weights.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` with `lora_A`, `lora_B`
plain `nn.Linear` layers. For a linear y = W a applied at every token t, the gradient
of sample n's loss is Σ_t g_t a_tᵀ, with a_t the layer input and g_t the gradient at
its output. A forward hook keeps a_t, a tensor hook on the output keeps g_t, and one
einsum per layer gives every sample's gradient for the batch. A LoRA gradient is small
(r × in or out × r per layer), so
holding one batch of them costs less than the activations already held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoraLinear:
    """One LoRA factor: `name` is its weight's parameter name in the PEFT model."""

    name: str
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)  # (out, in)


def lora_linears(model: nn.Module) -> list[LoraLinear]:
    """Every lora_A / lora_B linear of the active adapter, in parameter order."""
    modules = dict(model.named_modules())
    found = []
    for name, parameter in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight"):
            module = modules[name.removesuffix(".weight")]
            if not isinstance(module, nn.Linear) or module.bias is not None:
                raise ValueError(f"{name}: only bias-free nn.Linear LoRA factors are supported")
            found.append(LoraLinear(name, module))
            parameter.requires_grad_(True)
    if not found:
        raise ValueError("the model has no LoRA linears (is a PEFT LoRA adapter loaded?)")
    return found


class GradientTracker:
    """Records each LoRA linear's inputs and output gradients during one forward/backward."""

    def __init__(self, linears: list[LoraLinear]) -> None:
        self.linears = linears
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}

    @contextmanager
    def track(self) -> Iterator[GradientTracker]:
        handles = [
            linear.module.register_forward_hook(self._forward_hook(linear.name))
            for linear in self.linears
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            self.inputs[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self._keep_grad(name, grad))

        return hook

    def _keep_grad(self, name: str, grad: torch.Tensor) -> None:
        self.output_grads[name] = grad.detach()

    def clear(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()

    def per_sample_gradients(self) -> dict[str, torch.Tensor]:
        """{weight name: [batch, out, in]} for the last backward (float32)."""
        return {
            linear.name: torch.einsum(
                "bto,bti->boi",
                self.output_grads[linear.name].float(),
                self.inputs[linear.name].float(),
            )
            for linear in self.linears
        }
