"""GDRT (Wang et al., 2025): LoRA fine-tuning with group DRO over the completion's tokens.

SFT teaches a recommender to lean on the auxiliary context (the instruction, the title's
own earlier tokens) more than on the user's history. GDRT groups the completion tokens
by how much their prediction relies on the history, and trains against the worst groups
instead of the average token:

1. Grouping. A token's gain from the history is
   log p(token | prompt) − log p(token | the same prompt without the history titles);
   tokens the model predicts as well without the history (a popular title, the closing
   quote) have gains near 0 or below. All training tokens are cut into G equal-count
   groups by gain (group 0: the least history, G − 1: the most).
2. Loss. With L̄_g the mean NLL of the batch's tokens in group g (groups absent from the
   batch are skipped), the loss is max_q Σ_g q_g L̄_g − τ·KL(q ‖ uniform), whose closed
   form is τ·log((1/G_b) Σ_g exp(L̄_g / τ)) over the G_b groups present: a softmax weight
   on each group's loss, τ → 0 the worst group alone, τ → ∞ the groups' plain mean. The
   1/G_b only shifts the value (no gradient), so it lies between the mean and the max.
3. Training: the benchmark's recipe (`train_adapter`, same batches, same steps), with this
   loss in place of the mean of per-sample losses.

The gains are measured with the original adapter (plain SFT on the same data), not the
base model: the bias GDRT corrects is the one SFT induces, so reliance on the context is
read off the fine-tuned recommender. The base model has never seen the prompt format or
the catalog; without the history it predicts no title in particular, and its gain mostly
measures copying tokens from the listed titles. The groups are fixed before training
(measured once, two scoring passes), so the quantile cut and each token's group stay put
across steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fudlr.data.bundle import Bundle
from fudlr.data.prompts import PromptTemplate
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.recommender.train import (
    ProgressCallback,
    TrainConfig,
    TrainReport,
    select_samples,
    train_adapter,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GROUPING = (
    "log p(token | prompt) - log p(token | prompt without the history titles) under the "
    "original adapter, cut into equal-count groups over all training tokens"
)


@dataclass(frozen=True)
class GdrtSettings:
    """groups: G, how many quantile groups of the history gain; tau: τ, how hard the loss
    leans on the worst group (small τ: nearly the worst alone)."""

    groups: int = 4
    tau: float = 1.0

    def __post_init__(self) -> None:
        if self.groups < 1 or self.tau <= 0:
            raise ValueError(f"GDRT needs groups >= 1 and tau > 0, got {self}")


# the validation grid: coarse and fine groups, τ from near-worst-group to near-mean
GRID = tuple(GdrtSettings(groups, tau) for groups in (2, 4) for tau in (0.3, 1.0, 3.0))


def prompt_without_history(bundle: Bundle, samples: Sequence[SampleRow]) -> str:
    """The prompt every sample has once its history titles are left out (instruction and
    layout unchanged); refused unless each sample's prompt is the bundle's template
    applied to its history, so that nothing but the titles differs."""
    if "template" not in bundle.meta:
        raise InputError("meta.json does not record the prompt template", file=bundle.root)
    try:
        template = PromptTemplate.from_description(bundle.meta["template"])
    except ValueError as error:
        raise InputError(str(error), file=bundle.root / "meta.json", field="template") from None
    for sample in samples:
        titles = [bundle.items[item_id].title for item_id in sample.history]
        if template.prompt(titles) != sample.prompt:
            raise InputError(
                f"the prompt of sample '{sample.sample_id}' is not the template's rendering "
                "of its history",
                file=bundle.root / "train.jsonl",
                field="prompt",
            )
    return template.prompt([])


def _completion_nlls(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    config: TrainConfig,
    device: torch.device,
) -> list[torch.Tensor]:
    """Each (prompt, completion)'s completion-token NLLs, encoded as training encodes them;
    a pair that repeats (the history-free prompts share one per target) is run once."""
    from fudlr.models.device import autocast
    from fudlr.recommender.encoding import completion_nll, encode_sample, length_sorted_batches

    unique = list(dict.fromkeys(pairs))
    encoded = [encode_sample(tokenizer, p, c, config.max_length) for p, c in unique]
    found: dict[tuple[str, str], torch.Tensor] = {}
    batches = length_sorted_batches(encoded, config.batch_size, tokenizer.pad_token_id)
    for indices, batch in batches:
        with autocast(device, config.precision):
            nll, mask = completion_nll(model, batch.to(device))
        for row, index in enumerate(indices):
            found[unique[index]] = nll[row][mask[row]].cpu()
    return [found[pair] for pair in pairs]


def history_gains(
    base_model_dir: Path,
    adapter: Path,
    bundle: Bundle,
    config: TrainConfig,
    device: str = "auto",
) -> dict[str, torch.Tensor]:
    """sample id → each completion token's gain from the history (EOS included), for the
    training samples `config` selects: one scoring pass with the prompts, one without."""
    from fudlr.models.device import resolve_device
    from fudlr.models.lora import load_adapter
    from fudlr.models.store import load_base_model

    samples = select_samples(bundle.split("train"), config.max_samples, config.seed)
    empty = prompt_without_history(bundle, samples)
    target = resolve_device(device)
    base, tokenizer = load_base_model(base_model_dir, target)
    model = load_adapter(base, adapter)
    with torch.no_grad():
        with_history = _completion_nlls(
            model, tokenizer, [(s.prompt, s.completion) for s in samples], config, target
        )
        without = _completion_nlls(
            model, tokenizer, [(empty, s.completion) for s in samples], config, target
        )
    return {s.sample_id: w - h for s, h, w in zip(samples, with_history, without, strict=True)}


def quantile_groups(gains: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """sample id → each token's group, 0 (smallest gains) to count − 1 (largest), cut by
    rank over all tokens: each group holds ⌊N/count⌋ or ⌈N/count⌉ of the N tokens, and
    equal gains on a cut are split by their order rather than unbalancing the groups."""
    flat = torch.cat(list(gains.values()))
    total = flat.numel()
    if not 1 <= count <= total:
        raise ValueError(f"cannot cut {total} tokens into {count} groups")
    ranks = torch.empty(total, dtype=torch.long)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(total)
    groups = ranks * count // total
    return dict(zip(gains, groups.split([len(g) for g in gains.values()]), strict=True))


def group_dro_loss(nll: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """τ·log((1/G_b) Σ_g exp(L̄_g / τ)) over the groups present (group −1: not a token)."""
    present = groups[groups >= 0].unique().tolist()
    means = torch.stack([nll[groups == group].mean() for group in present])
    return tau * (torch.logsumexp(means / tau, dim=0) - math.log(len(present)))


@dataclass(frozen=True)
class GroupDroLoss:
    """The training hook (`TokenLoss`): puts each sample's token groups under its
    completion tokens and takes the group-DRO loss of the batch."""

    token_groups: Mapping[str, torch.Tensor]
    settings: GdrtSettings

    @classmethod
    def from_gains(cls, gains: Mapping[str, torch.Tensor], settings: GdrtSettings) -> GroupDroLoss:
        return cls(quantile_groups(gains, settings.groups), settings)

    def __call__(
        self, sample_ids: Sequence[str], nll: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        lengths = [len(self.token_groups[i]) for i in sample_ids]
        if mask.sum(dim=1).tolist() != lengths:
            raise ValueError("the token groups do not match the batch's completion tokens")
        groups = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        # boolean indexing walks the rows in order, as the samples' tokens are concatenated
        groups[mask] = torch.cat([self.token_groups[i] for i in sample_ids]).to(mask.device)
        return group_dro_loss(nll, groups, self.settings.tau)

    def describe(self) -> dict[str, Any]:
        return {"name": "gdrt", **asdict(self.settings), "grouping": GROUPING}


def train_gdrt(
    base_model_dir: Path,
    bundle: Bundle,
    out_dir: Path,
    gains: Mapping[str, torch.Tensor],
    settings: GdrtSettings,
    config: TrainConfig,
    device: str = "auto",
    progress: ProgressCallback | None = None,
) -> TrainReport:
    """A new adapter trained by `config` with the group-DRO loss; `gains` from
    `history_gains` with the same config (they do not depend on the settings, so a grid
    measures them once)."""
    return train_adapter(
        base_model_dir,
        bundle,
        out_dir,
        config,
        device=device,
        progress=progress,
        token_loss=GroupDroLoss.from_gains(gains, settings),
    )


@dataclass(frozen=True)
class Trial:
    """One setting trained and measured on the validation users."""

    settings: GdrtSettings
    unfairness: float
    ndcg: float


def choose_settings(trials: Sequence[Trial], original_ndcg: float, max_ndcg_drop: float) -> Trial:
    """The fairest trial whose validation NDCG is within `max_ndcg_drop` of the original's
    (the budget of the reranking's α and of FUDLR's guard), ties to the earlier; if none
    is, the most accurate, since GDRT is meant to gain accuracy, not trade it."""
    floor = original_ndcg * (1.0 - max_ndcg_drop)
    allowed = [trial for trial in trials if trial.ndcg >= floor]
    if not allowed:
        return max(trials, key=lambda trial: trial.ndcg)
    return min(allowed, key=lambda trial: trial.unfairness)
