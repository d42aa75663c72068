"""log p(title | prompt) for many candidate titles per prompt: the differentiable view.

The prompt is run once; its key/value cache is shared by all candidates, which are
scored in one batched pass on top of it. Gradients flow through both passes, so the
repair can differentiate group-level surrogates with respect to the LoRA weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fudlr.recommender.encoding import encode_completion, encode_prompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Prefix:
    """A prompt run once: its key/value cache per layer ([1, heads, length, dim]) and the
    log-probabilities of the first completion token ([1, vocab])."""

    length: int
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    first_logprobs: torch.Tensor


def encode_prefix(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str
) -> Prefix:
    import torch

    device = next(model.parameters()).device
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    output = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
    keys_values = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
    first = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
    return Prefix(prompt_ids.size(1), keys_values, first)


def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix: Prefix,
    keys_values: list[tuple[torch.Tensor, torch.Tensor]],
    first_logprobs: torch.Tensor,
    completions: Sequence[str],
) -> torch.Tensor:
    """Scores of len(completions) candidates on a prefix cache already holding one row each.

    `keys_values` and `first_logprobs` are the prefix's, repeated to the candidates (or
    leaf copies of them, when the caller wants the gradient at the prefix's outputs).
    """
    import torch
    from transformers import DynamicCache

    device = first_logprobs.device
    encoded = [encode_completion(tokenizer, text) for text in completions]
    copies, width = len(encoded), max(len(ids) for ids in encoded)
    candidate_ids = torch.full((copies, width), tokenizer.pad_token_id, dtype=torch.long)
    candidate_mask = torch.zeros((copies, width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        candidate_ids[row, : len(ids)] = torch.tensor(ids)
        candidate_mask[row, : len(ids)] = 1
    candidate_ids, candidate_mask = candidate_ids.to(device), candidate_mask.to(device)
    attention_mask = torch.cat(
        [torch.ones((copies, prefix.length), dtype=torch.long, device=device), candidate_mask],
        dim=1,
    )
    positions = torch.arange(prefix.length, prefix.length + width, device=device)
    output = model(
        input_ids=candidate_ids,
        attention_mask=attention_mask,
        position_ids=positions.expand(copies, -1),
        past_key_values=DynamicCache(keys_values, config=model.config),
        use_cache=True,
    )
    # token j of a candidate is predicted by the prompt's last position (j = 0)
    # or by candidate position j - 1
    following = torch.log_softmax(output.logits[:, :-1, :].float(), dim=-1)
    first = first_logprobs.expand(copies, -1).gather(1, candidate_ids[:, :1])
    rest = following.gather(2, candidate_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (torch.cat([first, rest], dim=1) * candidate_mask).sum(dim=1)


def repeat_rows(
    keys_values: list[tuple[torch.Tensor, torch.Tensor]], copies: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of a batch-1 cache as `copies` rows (no memory copied)."""
    return [
        (keys.expand(copies, -1, -1, -1), values.expand(copies, -1, -1, -1))
        for keys, values in keys_values
    ]


def score_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completions: Sequence[str],
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sum of token log-probabilities of each completion (+ EOS) after `prompt`, shape [C].

    Runs under the caller's grad mode: wrap in `torch.no_grad()` for plain scoring.
    """
    import torch

    prefix = encode_prefix(model, tokenizer, prompt)
    scores = []
    for start in range(0, len(completions), chunk_size):
        chunk = completions[start : start + chunk_size]
        scores.append(
            score_candidates(
                model,
                tokenizer,
                prefix,
                repeat_rows(prefix.keys_values, len(chunk)),
                prefix.first_logprobs,
                chunk,
            )
        )
    return torch.cat(scores)
