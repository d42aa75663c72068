"""Differentiable stand-ins of the hard fairness metrics, with their LoRA gradients.

Hard metrics come from beam search + grounding and have no gradient. The repair needs
quantities that move smoothly with the LoRA weights and track the hard ones:

- item side: the expected group distribution of the next recommendation. For a user u,
  p(i | u) ∝ w_i · exp(log p(title_i | prompt_u) / T) over a pool of items sampled per
  stratum (the catalog partitioned by each item's first group), w_i the stratum size
  over the number sampled (an unbiased estimate of the sum over the catalog). The share
  of group g is Σ_i p(i|u)·c_K(i, g), c_K(i, g) the memberships of g in the top-K list
  that grounding gives when the generation is item i's title (i and its nearest titles
  in the base model's embedding space, fixed per catalog), normalised over memberships
  like GP@K, and averaged over users.
- user side: each user group's mean log-likelihood of its true next item (−ℓ_u).
- accuracy: the mean validation loss.

Each quantity is returned with its gradient as a flat LoRA vector (ParameterLayout), so
that the influence of every training sample on it is one dot product.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fudlr.control import Control
from fudlr.data.schema import SampleRow
from fudlr.fairness.groups import Groups
from fudlr.influence.gradients import compute_sample_gradients
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.tracker import GradientTracker, LoraLinear
from fudlr.models.device import autocast
from fudlr.recommender.encoding import encode_completion, encode_sample
from fudlr.recommender.scoring import encode_prefix, score_candidates, score_completions


@dataclass(frozen=True)
class Pool:
    """The items scored for one user, their log importance weights, their group memberships."""

    items: tuple[str, ...]
    log_weights: torch.Tensor  # [C]
    membership: torch.Tensor  # [C, G] of 0/1


@dataclass
class Quantities:
    """Values of named differentiable quantities and their gradients ([k, dim]).

    per_user [U, k, dim] (float32): each query user's part of every gradient, so that
    `gradients` is their mean. It is what lets a sample's effect be tested against the
    spread over users (the query's own noise); U·k·dim·4 bytes.
    """

    names: list[str]
    values: torch.Tensor
    gradients: torch.Tensor
    per_user: torch.Tensor | None = None

    def columns(self, prefix: str) -> list[int]:
        """Positions of the quantities whose names start with `prefix`, in order."""
        return [i for i, name in enumerate(self.names) if name.startswith(prefix)]

    @classmethod
    def concat(cls, parts: list[Quantities]) -> Quantities:
        """All parts' quantities (per-user parts only if every part has them, same users)."""
        per_user = [part.per_user for part in parts]
        return cls(
            [name for part in parts for name in part.names],
            torch.cat([part.values for part in parts]),
            torch.cat([part.gradients for part in parts]),
            None if any(p is None for p in per_user) else torch.cat(per_user, dim=1),
        )


def sample_pools(
    rows: Sequence[SampleRow],
    groups: Groups,
    per_stratum: int,
    seed: int,
    neighborhoods: Mapping[str, Sequence[str]] | None = None,
    anchors: Sequence[Sequence[str]] | None = None,
) -> list[Pool]:
    """Per user, its anchors plus up to `per_stratum` other items of every stratum (first
    group of each item).

    `neighborhoods`: for each item, the top-K list that grounding produces when the
    generation is exactly that item's title (the item, then its nearest titles). An
    item's membership row then counts the groups of that whole list, so the surrogate
    models GP@K rather than only the first recommendation. None means K = 1.
    `anchors`: per user, items always in the pool with weight 1 — the items its beams
    ground to (its recommendation first). A fine-tuned model puts most of its probability on a few
    titles; a pool of random titles alone would estimate its distribution from the tail.
    The strata are then sampled among the remaining items, so the estimate of the sum
    over the catalog stays unbiased.
    """
    strata: dict[str, list[str]] = defaultdict(list)
    for item_id, names in groups.members.items():
        if names:
            strata[names[0]].append(item_id)
    column = {name: index for index, name in enumerate(groups.names)}
    rng = random.Random(seed)
    pools = []
    for position, _row in enumerate(rows):
        fixed = list(dict.fromkeys(anchors[position])) if anchors is not None else []
        items, log_weights = list(fixed), [0.0] * len(fixed)
        for name in sorted(strata):
            members = [item for item in strata[name] if item not in fixed]
            chosen = rng.sample(members, min(per_stratum, len(members)))
            items += chosen
            log_weights += [math.log(len(members) / len(chosen))] * len(chosen)
        membership = torch.zeros(len(items), len(groups.names))
        for row_index, item_id in enumerate(items):
            listed = neighborhoods[item_id] if neighborhoods is not None else (item_id,)
            for neighbour in listed:
                for name in groups.of(neighbour):
                    membership[row_index, column[name]] += 1.0
        pools.append(Pool(tuple(items), torch.tensor(log_weights), membership))
    return pools


def lora_parameters(model: torch.nn.Module, layout: ParameterLayout) -> list[torch.nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[name] for name in layout.names]


def shares_from_scores(scores: torch.Tensor, pool: Pool, temperature: float) -> torch.Tensor:
    """Expected group shares [G] from the pool's title log-likelihoods [C]."""
    device = scores.device
    probabilities = torch.softmax(scores / temperature + pool.log_weights.to(device), dim=0)
    shares = probabilities @ pool.membership.to(device)
    return shares / shares.sum()


def user_item_shares(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    pool: Pool,
    completions: dict[str, str],
    temperature: float,
) -> torch.Tensor:
    """One user's expected group shares of the next recommendation, [G], differentiable."""
    scores = score_completions(model, tokenizer, prompt, [completions[i] for i in pool.items])
    return shares_from_scores(scores, pool, temperature)


TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def calibrate_temperature(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[SampleRow],
    pools: Sequence[Pool],
    completions: dict[str, str],
    measured: torch.Tensor,
    grid: Sequence[float] = TEMPERATURES,
    precision: str = "fp32",
) -> tuple[float, dict[float, float]]:
    """The temperature whose surrogate shares come nearest (L1) to `measured`, the hard
    GP@K of the same users, with the distance at every temperature tried. `precision`:
    of the scoring pass (bf16 autocast where the decoding that measured GP@K used it: it
    only picks a temperature from the grid).

    How peaked a model's distribution over titles is depends on the model: a fine-tuned
    LLM puts its mass on a few titles, which decoding then picks; a weak one spreads it
    over the catalog. The temperature at which the surrogate reproduces what decoding
    actually recommends is the one at which its gradient speaks about those recommendations.
    """
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, precision):
        scores = [
            score_completions(model, tokenizer, row.prompt, [completions[i] for i in pool.items])
            .float()
            .cpu()
            for row, pool in zip(rows, pools, strict=True)
        ]
    distances = {}
    for temperature in grid:
        shares = sum(
            shares_from_scores(user_scores, pool, temperature).double()
            for user_scores, pool in zip(scores, pools, strict=True)
        ) / len(rows)
        distances[temperature] = float((shares - measured.double()).abs().sum())
    return min(distances, key=lambda t: distances[t]), distances


def mean_item_shares(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[SampleRow],
    pools: Sequence[Pool],
    completions: dict[str, str],
    temperature: float = 1.0,
    precision: str = "fp32",
) -> torch.Tensor:
    """The surrogate shares alone (no gradient): to see where a patch actually moved them.
    `precision`: that of the pass whose values they are compared with."""
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, precision):
        total = sum(
            user_item_shares(model, tokenizer, row.prompt, pool, completions, temperature).double()
            for row, pool in zip(rows, pools, strict=True)
        )
    return total.cpu() / len(rows)


def user_share_gradients(
    model: torch.nn.Module,
    tokenizer,
    linears: list[LoraLinear],
    layout: ParameterLayout,
    prompt: str,
    pool: Pool,
    completions: dict[str, str],
    temperature: float,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One user's shares [G] and their LoRA gradients [G, dim] with one backward pass over
    the candidates and G-1 short ones over the prompt; the forward passes under `precision`
    (bf16 autocast where the index's gradients were computed so), the gradients in fp32.

    share_g depends on the weights only through the candidates' scores s_j, so
    ∇share_g = Σ_j (∂share_g/∂s_j) ∇s_j. One backward of Σ_j s_j gives every candidate's
    own gradient from the hooks (candidates are separate rows) and, at leaf copies of the
    prompt's keys/values, how each candidate's score depends on the prompt; the prompt's
    part of each share is then one backward through the prompt alone.
    """
    parameters = lora_parameters(model, layout)
    with autocast(parameters[0].device, precision):
        prefix = encode_prefix(model, tokenizer, prompt)
    copies = len(pool.items)
    leaves = [
        (
            keys.detach().repeat(copies, 1, 1, 1).requires_grad_(),
            values.detach().repeat(copies, 1, 1, 1).requires_grad_(),
        )
        for keys, values in prefix.keys_values
    ]
    first_leaf = prefix.first_logprobs.detach().requires_grad_()
    tracker = GradientTracker(linears)
    with tracker.track():
        with autocast(parameters[0].device, precision):
            scores = score_candidates(
                model, tokenizer, prefix, leaves, first_leaf, [completions[i] for i in pool.items]
            )
        flat_leaves = [tensor for pair in leaves for tensor in pair]
        leaf_grads = torch.autograd.grad(
            scores.sum(), [*flat_leaves, first_leaf, *parameters], allow_unused=True
        )
    per_candidate = layout.flatten(tracker.per_sample_gradients()).double()  # [C, dim]
    kv_grads = leaf_grads[: len(flat_leaves)]

    local = scores.detach().requires_grad_()
    shares = shares_from_scores(local, pool, temperature)
    count = shares.numel()
    coefficients = torch.stack(
        [torch.autograd.grad(shares[g], local, retain_graph=True)[0] for g in range(count)]
    )  # [G, C]
    # a candidate's first token is scored by the prompt's last position
    first_ids = torch.tensor(
        [encode_completion(tokenizer, completions[item])[0] for item in pool.items],
        device=prefix.first_logprobs.device,
    )
    # keys of layers below the first LoRA do not depend on the weights: skip them
    prompt_outputs = [
        (tensor, grad)
        for tensor, grad in zip(
            [tensor for pair in prefix.keys_values for tensor in pair], kv_grads, strict=True
        )
        if tensor.requires_grad and grad is not None
    ]
    gradients = torch.zeros(count, layout.dim, dtype=torch.float64)
    for g in range(count - 1):
        weights = coefficients[g].to(scores.dtype)
        grad_outputs = [
            (weights.view(-1, 1, 1, 1) * grad).sum(dim=0, keepdim=True).to(tensor.dtype)
            for tensor, grad in prompt_outputs
        ]
        first_output = torch.zeros_like(prefix.first_logprobs)
        first_output[0].index_add_(0, first_ids, weights.to(first_output.dtype))
        prompt_part = torch.autograd.grad(
            [*(tensor for tensor, _ in prompt_outputs), prefix.first_logprobs],
            parameters,
            grad_outputs=[*grad_outputs, first_output],
            retain_graph=g < count - 2,
            allow_unused=True,
        )
        flat = torch.cat(
            [
                (grad if grad is not None else torch.zeros_like(p)).flatten()
                for grad, p in zip(prompt_part, parameters, strict=True)
            ]
        )
        gradients[g] = flat.double().cpu() + coefficients[g].double() @ per_candidate.cpu()
    gradients[count - 1] = -gradients[: count - 1].sum(dim=0)
    return shares.detach().double().cpu(), gradients


def item_share_quantities(
    model: torch.nn.Module,
    tokenizer,
    linears: list[LoraLinear],
    layout: ParameterLayout,
    rows: Sequence[SampleRow],
    pools: Sequence[Pool],
    groups: Groups,
    completions: dict[str, str],
    *,
    temperature: float = 1.0,
    control: Control | None = None,
    label: str = "item",
    precision: str = "fp32",
) -> Quantities:
    """Mean expected share of each item group over `rows`' users, with gradients."""
    control = control or Control()
    count = len(groups.names)
    values = torch.zeros(count, dtype=torch.float64)
    per_user = torch.zeros(len(rows), count, layout.dim, dtype=torch.float32)
    for done, (row, pool) in enumerate(zip(rows, pools, strict=True), start=1):
        shares, grads = user_share_gradients(
            model, tokenizer, linears, layout, row.prompt, pool, completions, temperature, precision
        )
        values += shares
        per_user[done - 1] = grads
        control.step(f"{label} group shares", done, len(rows))
    names = [f"{label}:share:{name}" for name in groups.names]
    gradients = per_user.double().mean(dim=0)
    return Quantities(names, values / len(rows), gradients, per_user)


def loss_quantities(
    model: torch.nn.Module,
    tokenizer,
    linears: list[LoraLinear],
    layout: ParameterLayout,
    rows: Sequence[SampleRow],
    user_groupings: Sequence[Groups],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    control: Control | None = None,
    precision: str = "fp32",
) -> Quantities:
    """Mean validation loss and, per user grouping, each group's mean log-likelihood.

    One pass of per-sample gradients serves all of them: each is an average of ±∇ℓ_u.
    """
    control = control or Control()
    encoded = [encode_sample(tokenizer, r.prompt, r.completion, max_length) for r in rows]
    losses = torch.zeros(len(rows), dtype=torch.float64)
    per_user = torch.zeros(len(rows), layout.dim, dtype=torch.float32)
    for indices, grads, batch_losses in compute_sample_gradients(
        model,
        linears,
        layout.flatten,
        encoded,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        control=control,
        stage="validation gradients",
        precision=precision,
    ):
        per_user[indices] = grads
        losses[indices] = batch_losses.double()
    names, parts = _loss_parts(rows, user_groupings)
    values = parts.double().T @ losses / len(rows)
    user_parts = parts[:, :, None] * per_user[:, None, :]  # [U, k, dim]
    gradients = user_parts.double().mean(dim=0)
    return Quantities(names, values, gradients, user_parts)


def _loss_parts(
    rows: Sequence[SampleRow], user_groupings: Sequence[Groups]
) -> tuple[list[str], torch.Tensor]:
    """The loss quantities' names and, per user, its coefficient in each ([U, k]): every
    quantity is a mean over all users, Σ_u part[u, q]·ℓ_u / U: 1 for the validation loss,
    -U/|group| for a user group's mean log-likelihood (members only)."""
    names, parts = ["accuracy:loss"], [torch.ones(len(rows))]
    for grouping in user_groupings:
        for name in grouping.names:
            members = [i for i, row in enumerate(rows) if name in grouping.of(row.user_id)]
            if not members:
                continue
            names.append(f"user:{grouping.attribute}:loglik:{name}")
            part = torch.zeros(len(rows))
            part[members] = -len(rows) / len(members)
            parts.append(part)
    return names, torch.stack(parts, dim=1)
