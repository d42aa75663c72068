"""Beam-search generation of the next item's title, batched with left padding.

`transformers.generate` repeats every prompt `num_beams` times *before* the first
forward pass, so the prompt (most of the tokens here) is encoded once per beam. This
beam search encodes each prompt once and its beams share that key/value cache
(shared_prefix.py), which makes 5 beams cost little more than greedy decoding. The
search rule is the one of `generate(num_beams=K, early_stopping=True,
length_penalty=1.0)`, and a test holds the two to the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fudlr.recommender.encoding import encode_prompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DEAD = -1.0e9


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch (ids, attention mask)."""
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class PromptBeams:
    """Left-padded prompts run once, their key/value cache shared by `beams` rows each (a
    SharedPrefixCache); a step reorders the rows to the surviving hypotheses and feeds one
    token per row. Both beam searches (free text, and constrained to the catalog) decode
    through it."""

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        beams: int,
    ) -> None:
        from fudlr.recommender.shared_prefix import SharedPrefixCache

        self.model = model
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        prefill = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        self.cache = SharedPrefixCache(prefill, attention_mask, beams)
        self.next_position = positions[:, -1:].repeat_interleave(beams, dim=0) + 1
        self.first_logprobs = _last_logprobs(output).repeat_interleave(beams, dim=0)

    def step(self, origins: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Row r continues row `origins[r]` with `tokens[r]`; the next token's log-probabilities."""
        import torch

        from fudlr.recommender.shared_prefix import shared_prefix_attention

        device = self.next_position.device
        index = torch.tensor(origins, device=device)
        self.cache.reorder(index)
        with shared_prefix_attention(self.model):
            output = self.model(
                input_ids=torch.tensor(tokens, device=device).view(-1, 1),
                position_ids=self.next_position[index],
                past_key_values=self.cache,
                use_cache=True,
            )
        self.next_position = self.next_position[index] + 1
        return _last_logprobs(output)


def _last_logprobs(output) -> torch.Tensor:
    import torch

    return torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)


def beam_search(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int,
    length_penalty: float = 1.0,
    returns: int = 1,
) -> list[list[list[int]]]:
    """The `returns` best continuations (without EOS, best first) of each left-padded
    prompt; num_beams=1 is greedy.

    A hypothesis ends at EOS or at `max_new_tokens`; its score is the sum of token
    log-probabilities over its length (EOS counted) to the power `length_penalty`. Only
    the K best of the 2K candidates of a step may end; a prompt is done once K ended.
    """
    import torch

    batch, beams = input_ids.size(0), num_beams
    prompts = PromptBeams(model, input_ids, attention_mask, beams)
    logprobs = prompts.first_logprobs
    vocab = logprobs.size(-1)

    scores = torch.full((batch, beams), _DEAD, device=input_ids.device)
    scores[:, 0] = 0.0  # all beams start as copies of the prompt: keep one alive
    sequences: list[list[int]] = [[] for _ in range(batch * beams)]
    ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    for step in range(max_new_tokens):
        candidates = (scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
        top_scores, top_index = candidates.topk(2 * beams, dim=1)
        origins, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        top_scores_list = top_scores.tolist()
        last_step = step == max_new_tokens - 1
        new_scores = torch.full((batch, beams), _DEAD, device=input_ids.device)
        new_rows, new_tokens = [], []
        for row in range(batch):
            kept: list[tuple[float, int, int]] = []
            if len(ended[row]) < beams:
                for rank in range(2 * beams):
                    score, origin, token = (
                        top_scores_list[row][rank],
                        origins[row][rank],
                        tokens[row][rank],
                    )
                    if token == eos_token_id or last_step:
                        if rank < beams:
                            text = sequences[row * beams + origin]
                            text = text if token == eos_token_id else [*text, token]
                            ended[row].append((score / (step + 1) ** length_penalty, text))
                    elif len(kept) < beams:
                        kept.append((score, origin, token))
            kept += [(_DEAD, 0, eos_token_id)] * (beams - len(kept))
            for slot, (score, origin, token) in enumerate(kept):
                new_scores[row, slot] = score
                new_rows.append(row * beams + origin)
                new_tokens.append(token)
        if all(len(row_ended) >= beams for row_ended in ended) or last_step:
            break
        sequences = [
            [*sequences[source], token] for source, token in zip(new_rows, new_tokens, strict=True)
        ]
        scores = new_scores
        logprobs = prompts.step(new_rows, new_tokens)
    ranked = [sorted(row_ended, key=lambda hypothesis: -hypothesis[0]) for row_ended in ended]
    return [[text for _, text in row_ranked[:returns]] for row_ranked in ranked]


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    num_beams: int = 5,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    returns: int = 1,
) -> list[list[str]]:
    """The `returns` best beams' texts for every prompt (best first; at most num_beams);
    prompts are tokenised exactly as in training."""
    import torch

    device = next(model.parameters()).device
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        input_ids, attention_mask = left_pad(
            [encode_prompt(tokenizer, prompt) for prompt in chunk], tokenizer.pad_token_id
        )
        with torch.no_grad():
            best = beam_search(
                model,
                input_ids.to(device),
                attention_mask.to(device),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                returns=returns,
            )
        completions.extend(
            [text.strip() for text in tokenizer.batch_decode(texts, skip_special_tokens=True)]
            for texts in best
        )
        if progress is not None:
            progress(len(chunk))
    return completions
