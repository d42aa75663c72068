"""Per-sample gradients kept as a few coordinates in the curvature's eigenbasis.

A dense LoRA gradient costs two bytes per adapter weight per training sample; for a
large base model and a large training set the cache outgrows any disk. FUDLR keeps, per
sample, only the coordinates of its gradient in the EK-FAC eigenbasis (Q_Gᵀ g Q_A, one
matrix per LoRA weight) where the damped inverse curvature weighs the most gradient
energy, chosen once for the whole adapter.

Why these coordinates and not a random sketch (LoGra's): in the eigenbasis the damped
curvature is diagonal, so an influence score is a sum over coordinates of
g̃ q̃ / (λ + damping), and EK-FAC's eigenvalue λ of a coordinate *is* the mean squared
training gradient along it. A coordinate's expected share of a score therefore grows
with λ / (λ + damping): keeping the largest ones keeps the score exactly on them (no
projected curvature to fit, no sketching noise), and the share left out is known from
the curvature alone before any score is computed (`kept_share`).

The Newton step needs the selected samples' full gradients, which a job recomputes in a
pass over those samples only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fudlr.influence.curvature import Curvature
from fudlr.influence.layout import ParameterLayout


@dataclass(frozen=True)
class EigenProjection:
    """Per LoRA weight (layout order), the flat indices of the kept eigen-coordinates."""

    names: tuple[str, ...]
    kept: tuple[torch.Tensor, ...]

    @classmethod
    def fit(cls, curvature: Curvature, layout: ParameterLayout, dim: int) -> EigenProjection:
        """The `dim` coordinates with the largest λ / (λ + damping) over all LoRA weights."""
        weights = [_score_weights(curvature, name) for name in layout.names]
        flat = torch.cat(weights)
        chosen = torch.topk(flat, min(dim, flat.numel())).indices
        kept, start = [], 0
        for weight in weights:
            inside = chosen[(chosen >= start) & (chosen < start + weight.numel())] - start
            kept.append(torch.sort(inside).values)
            start += weight.numel()
        return cls(layout.names, tuple(kept))

    @property
    def dim(self) -> int:
        return sum(len(indices) for indices in self.kept)

    def kept_share(self, curvature: Curvature) -> float:
        """Σ λ/(λ+damping) over the kept coordinates / over all of them: the expected share
        of an influence score's magnitude that the projection keeps."""
        kept = total = 0.0
        for name, indices in zip(self.names, self.kept, strict=True):
            weights = _score_weights(curvature, name)
            kept += float(weights[indices].sum())
            total += float(weights.sum())
        return kept / total if total > 0 else 1.0

    def project(self, curvature: Curvature, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [..., out, in]} gradients -> [..., dim] kept eigen-coordinates."""
        return self._gather({n: curvature.layers[n].rotate(g) for n, g in grads.items()})

    def precondition(self, curvature: Curvature, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(H + λI)⁻¹ grads in the kept eigen-coordinates: a score is then one dot product
        with a projected training gradient."""
        return self._gather(
            {
                n: curvature.layers[n].rotate(g) * curvature.layers[n].inverse()
                for n, g in grads.items()
            }
        )

    def _gather(self, rotated: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [
                rotated[name].flatten(start_dim=-2).float().index_select(-1, indices)
                for name, indices in zip(self.names, self.kept, strict=True)
            ],
            dim=-1,
        )

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                name: indices.contiguous()
                for name, indices in zip(self.names, self.kept, strict=True)
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path, layout: ParameterLayout) -> EigenProjection:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(layout.names, tuple(tensors[name] for name in layout.names))


def _score_weights(curvature: Curvature, name: str) -> torch.Tensor:
    """λ/(λ+damping) of every eigen-coordinate of one LoRA weight, flattened."""
    layer = curvature.layers[name]
    return (layer.eigenvalues / (layer.eigenvalues + layer.damping)).flatten().double()
