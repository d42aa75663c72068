"""Samples as token ids, batches, and the per-sample loss every later stage shares.

Prompt and completion are tokenised separately and concatenated (+ EOS), so the
boundary is exact: training, influence scoring and title scoring all see the same
completion tokens, and generation starts exactly where the completion starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of prompt + completion + EOS; `completion_start` is where the loss begins."""

    input_ids: tuple[int, ...]
    completion_start: int
    truncated: bool


@dataclass
class Batch:
    """Left-padded so every completion ends at the last column: logits are then only
    needed for the last `loss_window` positions, which skips most of the vocabulary
    projection (the costliest layer of a small LM)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_window: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.loss_window,
        )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Completion tokens end with EOS so that the model learns where a title stops."""
    return [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> EncodedSample:
    """Keep the whole completion; if too long, drop the prompt's oldest tokens (oldest history)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = encode_completion(tokenizer, completion)
    room = max_length - len(completion_ids)
    if room < 1:
        raise ValueError(f"completion of {len(completion_ids)} tokens exceeds max_length")
    truncated = len(prompt_ids) > room
    if truncated:
        prompt_ids = prompt_ids[-room:]
    return EncodedSample(tuple(prompt_ids + completion_ids), len(prompt_ids), truncated)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> Batch:
    """Left-pad; labels are the completion tokens only (prompt and padding ignored)."""
    import torch

    width = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = torch.tensor(sample.input_ids, dtype=torch.long)
        offset = width - len(ids)
        input_ids[row, offset:] = ids
        attention_mask[row, offset:] = 1
        labels[row, offset + sample.completion_start :] = ids[sample.completion_start :]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    longest_completion = max(len(s.input_ids) - s.completion_start for s in samples)
    return Batch(input_ids, attention_mask, position_ids, labels, longest_completion + 1)


def completion_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each completion token, and those tokens (IGNORE_INDEX elsewhere).

    Shapes [batch, window - 1, vocab] and [batch, window - 1]: only the last `loss_window`
    positions are projected onto the vocabulary.
    """
    window = min(batch.loss_window, batch.input_ids.size(1))
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=window,
    ).logits
    targets = batch.labels[:, batch.labels.size(1) - window + 1 :]
    return logits[:, :-1, :].float(), targets


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, 0 where the target is IGNORE_INDEX."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)


def completion_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion token's NLL (0 elsewhere) and the mask of the completion tokens, both
    [batch, window - 1]: a row's completion tokens are its last masked columns, in order."""
    logits, targets = completion_logits(model, batch)
    return token_nll(logits, targets), targets != IGNORE_INDEX


def sample_means(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ℓ_i, shape [batch]: the mean of each row's masked token NLLs."""
    return nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def per_sample_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over each sample's completion tokens: ℓ_i, shape [batch]."""
    return sample_means(*completion_nll(model, batch))


def length_sorted_batches(
    samples: Sequence[EncodedSample], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], Batch]]:
    """(sample indices, batch) over all samples, similar lengths together to waste no padding.

    For passes whose result is stored per sample (scores, gradients), so order is free.
    """
    order = sorted(range(len(samples)), key=lambda index: len(samples[index].input_ids))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, collate([samples[index] for index in indices], pad_id)
