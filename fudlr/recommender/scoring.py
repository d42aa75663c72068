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


def _candidate_batch(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The completions' tokens (+ EOS), right-padded: ids and mask [C, width]."""
    import torch

    encoded = [encode_completion(tokenizer, text) for text in completions]
    width = max(len(ids) for ids in encoded)
    candidate_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    candidate_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        candidate_ids[row, : len(ids)] = torch.tensor(ids)
        candidate_mask[row, : len(ids)] = 1
    return candidate_ids.to(device), candidate_mask.to(device)


def _summed_logprobs(
    logits: torch.Tensor,
    first_logprobs: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_mask: torch.Tensor,
) -> torch.Tensor:
    """Each candidate's summed token log-probabilities: token j is predicted by the
    prompt's last position (j = 0) or by candidate position j - 1."""
    import torch

    following = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    first = first_logprobs.expand(candidate_ids.size(0), -1).gather(1, candidate_ids[:, :1])
    rest = following.gather(2, candidate_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (torch.cat([first, rest], dim=1) * candidate_mask).sum(dim=1)


def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix: Prefix,
    keys_values: list[tuple[torch.Tensor, torch.Tensor]],
    first_logprobs: torch.Tensor,
    completions: Sequence[str],
) -> torch.Tensor:
    """Scores of len(completions) candidates on a prefix cache holding one row each: leaf
    copies of the prefix's keys/values, when the caller wants the gradient of each
    candidate's score at its own copy of the prompt's outputs."""
    import torch
    from transformers import DynamicCache

    candidate_ids, candidate_mask = _candidate_batch(tokenizer, completions, first_logprobs.device)
    copies, width = candidate_ids.shape
    attention_mask = torch.cat(
        [
            torch.ones((copies, prefix.length), dtype=torch.long, device=candidate_ids.device),
            candidate_mask,
        ],
        dim=1,
    )
    positions = torch.arange(prefix.length, prefix.length + width, device=candidate_ids.device)
    output = model(
        input_ids=candidate_ids,
        attention_mask=attention_mask,
        position_ids=positions.expand(copies, -1),
        past_key_values=DynamicCache(keys_values, config=model.config),
        use_cache=True,
    )
    return _summed_logprobs(output.logits, first_logprobs, candidate_ids, candidate_mask)


def score_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completions: Sequence[str],
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sum of token log-probabilities of each completion (+ EOS) after `prompt`, shape [C].

    The candidates attend to one copy of the prompt's keys/values (SharedPrefixCache).
    Runs under the caller's grad mode: wrap in `torch.no_grad()` for plain scoring.
    """
    import torch

    from fudlr.recommender.shared_prefix import SharedPrefixCache, shared_prefix_attention

    prefix = encode_prefix(model, tokenizer, prompt)
    device = prefix.first_logprobs.device
    prompt_mask = torch.ones((1, prefix.length), dtype=torch.long, device=device)
    scores = []
    for start in range(0, len(completions), chunk_size):
        candidate_ids, candidate_mask = _candidate_batch(
            tokenizer, completions[start : start + chunk_size], device
        )
        copies, width = candidate_ids.shape
        positions = torch.arange(prefix.length, prefix.length + width, device=device)
        with shared_prefix_attention(model):
            output = model(
                input_ids=candidate_ids,
                position_ids=positions.expand(copies, -1),
                past_key_values=SharedPrefixCache(prefix.keys_values, prompt_mask, copies),
                use_cache=True,
            )
        scores.append(
            _summed_logprobs(output.logits, prefix.first_logprobs, candidate_ids, candidate_mask)
        )
    return torch.cat(scores)
