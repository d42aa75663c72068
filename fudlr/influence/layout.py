"""One flat vector for all LoRA weights, so many samples' gradients form one matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fudlr.influence.tracker import LoraLinear


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes ([out, in]) of the LoRA weights, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, linears: list[LoraLinear]) -> ParameterLayout:
        return cls(tuple(x.name for x in linears), tuple(x.shape for x in linears))

    @property
    def sizes(self) -> list[int]:
        return [rows * cols for rows, cols in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """[..., out, in] per layer -> [..., dim]."""
        return torch.cat([grads[name].flatten(start_dim=-2) for name in self.names], dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., dim] -> {name: [..., out, in]}."""
        parts = torch.split(vector, self.sizes, dim=-1)
        return {
            name: part.unflatten(-1, shape)
            for name, shape, part in zip(self.names, self.shapes, parts, strict=True)
        }

    def describe(self) -> list[dict]:
        return [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes, strict=True)]
