"""K-FAC / EK-FAC curvature of the damped Gauss-Newton matrix over every LoRA linear.

For a linear layer with inputs a and output gradients g, K-FAC approximates its block
of the Gauss-Newton (true Fisher) matrix by A ⊗ G with A = E_tokens[a aᵀ] and
G = Σ_tokens g gᵀ / n. In the eigenbases of A and G (Q_A, Q_G) the block is diagonal;
EK-FAC replaces the Kronecker eigenvalues λ_G λ_Aᵀ by the exact second moments of the
per-sample gradients in that basis (George et al. 2018). H⁻¹v is then two small
rotations and a division per layer.

Why sampled labels: for cross-entropy the Fisher under labels drawn from the model
equals the Gauss-Newton matrix. The loss of sample n is a mean over its T_n completion
tokens, so the sampled loss is scaled by 1/sqrt(T_n): then E[g̃ g̃ᵀ] is sample n's
Gauss-Newton block exactly, and H is the Gauss-Newton matrix of the mean training loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fudlr.control import Control
from fudlr.influence.tracker import GradientTracker, LoraLinear
from fudlr.models.device import autocast
from fudlr.recommender.encoding import IGNORE_INDEX, Batch, completion_logits, token_nll

KINDS = ("kfac", "ekfac")
FISHERS = ("true", "empirical")


@dataclass
class LayerCurvature:
    """One LoRA linear's curvature in its Kronecker eigenbasis."""

    q_in: torch.Tensor  # [in, in] eigenvectors of A
    q_out: torch.Tensor  # [out, out] eigenvectors of G
    eigenvalues: torch.Tensor  # [out, in]
    damping: float

    def rotate(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient [..., out, in] in the eigenbasis, where the curvature is diagonal."""
        return self.q_out.T @ grad.to(self.q_out.dtype) @ self.q_in

    def inverse(self) -> torch.Tensor:
        """The damped inverse's diagonal in the eigenbasis: 1 / (eigenvalues + damping)."""
        return 1.0 / (self.eigenvalues + self.damping)

    def _apply(self, grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (self.q_out @ (self.rotate(grad) * scale) @ self.q_in.T).to(grad.dtype)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ grad for a gradient of shape [..., out, in]."""
        return self._apply(grad, self.inverse())

    def multiply(self, grad: torch.Tensor) -> torch.Tensor:
        """(H + λI) grad: the approximation itself, to check it against exact products."""
        return self._apply(grad, self.eigenvalues + self.damping)


@dataclass
class Curvature:
    """Per-layer curvature of one adapter version; keys are LoRA weight names."""

    layers: dict[str, LayerCurvature]
    kind: str
    fisher: str
    damping_factor: float
    samples: int

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.layers[name].precondition(grad) for name, grad in grads.items()}

    def multiply(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.layers[name].multiply(grad) for name, grad in grads.items()}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, layer in self.layers.items():
            tensors[f"{name}::q_in"] = layer.q_in.contiguous()
            tensors[f"{name}::q_out"] = layer.q_out.contiguous()
            tensors[f"{name}::eigenvalues"] = layer.eigenvalues.contiguous()
            meta[name] = layer.damping
        header = {
            "kind": self.kind,
            "fisher": self.fisher,
            "damping_factor": str(self.damping_factor),
            "samples": str(self.samples),
            "damping": json.dumps(meta),
        }
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata=header)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> Curvature:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            damping = json.loads(header["damping"])
            layers = {
                name: LayerCurvature(
                    q_in=handle.get_tensor(f"{name}::q_in"),
                    q_out=handle.get_tensor(f"{name}::q_out"),
                    eigenvalues=handle.get_tensor(f"{name}::eigenvalues"),
                    damping=value,
                )
                for name, value in damping.items()
            }
        return cls(
            layers=layers,
            kind=header["kind"],
            fisher=header["fisher"],
            damping_factor=float(header["damping_factor"]),
            samples=int(header["samples"]),
        )


def curvature_loss(
    model: torch.nn.Module, batch: Batch, fisher: str, generator: torch.Generator
) -> torch.Tensor:
    """Σ_n ℓ̃_n whose per-sample gradients g̃_n satisfy E[g̃_n g̃_nᵀ] = GGN_n (true Fisher)."""
    logits, targets = completion_logits(model, batch)
    completion = targets != IGNORE_INDEX
    if fisher == "true":
        with torch.no_grad():
            probabilities = torch.softmax(logits, dim=-1).view(-1, logits.size(-1))
            sampled = torch.multinomial(probabilities.cpu(), 1, generator=generator)
            sampled = sampled.view_as(targets).to(targets.device)
        targets = torch.where(completion, sampled, targets)
    counts = completion.sum(dim=1).clamp(min=1)
    return (token_nll(logits, targets).sum(dim=1) / counts.sqrt()).sum()


@dataclass
class _CurvaturePasses:
    """Passes of backward on the curvature loss; each batch is yielded while the tracker
    holds its inputs and output gradients."""

    model: torch.nn.Module
    linears: list[LoraLinear]
    batches: Callable[[], Iterable[tuple[list[int], Batch]]]
    fisher: str
    precision: str
    control: Control
    total_batches: int | None

    def run(self, stage: str, seed: int) -> Iterator[tuple[list[int], Batch, GradientTracker]]:
        device = next(self.model.parameters()).device
        tracker = GradientTracker(self.linears)
        generator = torch.Generator().manual_seed(seed)
        with tracker.track():
            for done, (indices, batch) in enumerate(self.batches(), start=1):
                batch = batch.to(device)
                self.model.zero_grad(set_to_none=True)
                with autocast(device, self.precision):
                    loss = curvature_loss(self.model, batch, self.fisher, generator)
                loss.backward()
                yield indices, batch, tracker
                tracker.clear()
                self.control.step(stage, done, self.total_batches or done)
        self.model.zero_grad(set_to_none=True)


def fit_curvature(
    model: torch.nn.Module,
    linears: list[LoraLinear],
    batches: Callable[[], Iterable[tuple[list[int], Batch]]],
    *,
    kind: str = "ekfac",
    fisher: str = "true",
    damping_factor: float = 0.1,
    seed: int = 0,
    control: Control | None = None,
    total_batches: int | None = None,
    precision: str = "fp32",
) -> Curvature:
    """Fit the factors in one pass (and the EK-FAC eigenvalues in a second one)."""
    if kind not in KINDS or fisher not in FISHERS:
        raise ValueError(f"kind must be one of {KINDS}, fisher one of {FISHERS}")
    passes = _CurvaturePasses(
        model, linears, batches, fisher, precision, control or Control(), total_batches
    )
    input_cov, output_cov = {}, {}
    for linear in linears:
        out_features, in_features = linear.shape
        input_cov[linear.name] = torch.zeros(in_features, in_features, dtype=torch.float64)
        output_cov[linear.name] = torch.zeros(out_features, out_features, dtype=torch.float64)
    tokens, samples = 0, 0
    for indices, batch, tracker in passes.run("curvature factors", seed):
        mask = batch.attention_mask.bool()
        # q_proj's and v_proj's lora_A read the same hidden states: one product serves both
        products: dict[int, torch.Tensor] = {}
        for linear in linears:
            inputs = tracker.inputs[linear.name]
            if id(inputs) not in products:
                masked = inputs[mask].float()
                products[id(inputs)] = (masked.T @ masked).double().cpu()
            input_cov[linear.name] += products[id(inputs)]
            grads = tracker.output_grads[linear.name][mask].float()
            output_cov[linear.name] += (grads.T @ grads).double().cpu()
        tokens += int(mask.sum())
        samples += len(indices)

    bases = {}
    for linear in linears:
        in_values, q_in = torch.linalg.eigh(input_cov[linear.name] / tokens)
        out_values, q_out = torch.linalg.eigh(output_cov[linear.name] / samples)
        kronecker = torch.outer(out_values.clamp(min=0), in_values.clamp(min=0))
        bases[linear.name] = (q_in.float(), q_out.float(), kronecker.float())

    if kind == "ekfac":
        eigenvalues = _corrected_eigenvalues(passes, bases, seed + 1)
    else:
        eigenvalues = {name: kronecker for name, (_, _, kronecker) in bases.items()}

    layers = {
        name: LayerCurvature(
            q_in=q_in,
            q_out=q_out,
            eigenvalues=eigenvalues[name],
            damping=damping_factor * float(eigenvalues[name].mean()) or 1e-8,
        )
        for name, (q_in, q_out, _) in bases.items()
    }
    return Curvature(layers, kind, fisher, damping_factor, samples)


def _corrected_eigenvalues(
    passes: _CurvaturePasses,
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    seed: int,
) -> dict[str, torch.Tensor]:
    """E_n[(Q_Gᵀ g̃_n Q_A)²]: the exact diagonal of H in the Kronecker eigenbasis."""
    sums = {name: torch.zeros_like(kronecker) for name, (_, _, kronecker) in bases.items()}
    samples = 0
    for indices, _batch, tracker in passes.run("curvature eigenvalues", seed):
        for name, grads in tracker.per_sample_gradients().items():
            q_in, q_out, _ = bases[name]
            rotated = q_out.T @ grads.cpu() @ q_in
            sums[name] += rotated.square().sum(dim=0)
        samples += len(indices)
    return {name: total / samples for name, total in sums.items()}
