"""Beams that share a prompt attend to one copy of its keys and values.

A beam search over B prompts with `beams` beams each runs B·beams rows. The usual cache
holds every row's whole sequence, so each step copies the prompt's keys and values once
per beam, reorders them to the surviving hypotheses and appends to them: bytes moved per
step grow with beams × prompt length, and on a CPU they, not the matmuls, were most of a
decoding step. Here the prompt part stays [B, heads, prompt, dim], computed once by the
prefill; only the generated tokens are kept per row, reordered and grown. Attention splits
the same way: each query scores its prompt's keys (one matmul per prompt, all of its beams'
queries at once) and its own generated keys, under one softmax.

It plugs into transformers through its attention interface (the model's own projections,
rotary embeddings and MLPs run unchanged); the cache's `update` hands the attention both
parts. A hypothesis' origin must be a beam of the same prompt, as in every beam search.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

# imported only where a model already runs (decoding, scoring), so transformers is loaded
from transformers import AttentionInterface

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

ATTENTION = "fudlr_shared_prefix"


@dataclass
class _Layer:
    """What the cache hands attention for one layer in place of its keys and values."""

    cache: SharedPrefixCache
    index: int


class SharedPrefixCache:
    """The prefill's cache kept once per prompt, plus each row's generated keys and values."""

    def __init__(
        self,
        keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor,
        beams: int,
    ) -> None:
        """`keys_values`: the prefill's per layer ([B, kv_heads, prompt, dim]);
        `attention_mask`: the prompts' ([B, prompt], 0 at left padding)."""
        import torch

        keys = keys_values[0][0]
        self.beams = beams
        # fp32, as a fused attention kernel keeps its scores and sums under bf16 autocast
        self.prompt_keys = [layer_keys.float() for layer_keys, _ in keys_values]
        self.prompt_values = [layer_values.float() for _, layer_values in keys_values]
        rows, (kv_heads, head_dim) = keys.size(0) * beams, keys.shape[1::2]
        empty = keys.new_zeros((rows, kv_heads, 0, head_dim), dtype=torch.float32)
        self.keys = [empty] * len(self.prompt_keys)
        self.values = [empty] * len(self.prompt_keys)
        # left padding: no query attends to a prompt's pad positions
        padding = torch.zeros(attention_mask.shape, dtype=torch.float32, device=keys.device)
        self.prompt_bias = padding.masked_fill(attention_mask == 0, float("-inf"))

    def reorder(self, origins: torch.Tensor) -> None:
        """Row r continues row origins[r] (a beam of the same prompt)."""
        import torch

        same_prompt = torch.div(origins, self.beams, rounding_mode="floor")
        rows = torch.arange(len(origins), device=origins.device) // self.beams
        if not bool((same_prompt == rows).all()):
            raise ValueError("a beam can only continue a beam of its own prompt")
        self.keys = [keys.index_select(0, origins) for keys in self.keys]
        self.values = [values.index_select(0, origins) for values in self.values]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[_Layer, _Layer]:
        """Append this step's keys and values (the attention below reads them)."""
        import torch

        self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states.float()], dim=2)
        self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states.float()], dim=2)
        layer = _Layer(self, layer_idx)
        return layer, layer

    def attention(self, query: torch.Tensor, layer: int, scaling: float) -> torch.Tensor:
        """Softmax attention of each row's new tokens ([B·beams, heads, new, dim]) over its
        prompt and, causally, its own generated tokens; [B·beams, new, heads, dim]."""
        import torch

        prompt_keys, prompt_values = self.prompt_keys[layer], self.prompt_values[layer]
        rows, heads, new, dim = query.shape
        prompts, kv_heads, prompt_length, _ = prompt_keys.shape
        beams, groups = rows // prompts, heads // kv_heads
        generated = self.keys[layer].size(2)
        shape = (prompts, kv_heads, beams, -1, dim)
        # query head h·groups + g reads key/value head h (grouped-query attention)
        grouped = query.float().view(prompts, beams, kv_heads, groups, new, dim)
        grouped = grouped.permute(0, 2, 1, 3, 4, 5)  # [B, kv_heads, beams, groups, new, dim]
        generated_keys = self.keys[layer].view(prompts, beams, kv_heads, -1, dim).transpose(1, 2)
        generated_values = self.values[layer].view(prompts, beams, kv_heads, -1, dim)
        generated_values = generated_values.transpose(1, 2)
        on_prompt = grouped.reshape(prompts, kv_heads, -1, dim) @ prompt_keys.mT
        on_prompt = on_prompt.view(prompts, kv_heads, beams, groups, new, prompt_length)
        on_prompt = on_prompt * scaling + self.prompt_bias[:, None, None, None, None, :]
        on_generated = grouped.reshape(shape) @ generated_keys.mT * scaling
        on_generated = on_generated.view(prompts, kv_heads, beams, groups, new, generated)
        # new token i sits at generated position generated - new + i
        position = torch.arange(generated, device=query.device)
        latest = generated - new + torch.arange(new, device=query.device)
        on_generated = on_generated.masked_fill(position > latest[:, None], float("-inf"))
        weights = torch.softmax(torch.cat([on_prompt, on_generated], dim=-1), dim=-1)
        output = weights[..., :prompt_length].reshape(prompts, kv_heads, -1, prompt_length)
        output = (output @ prompt_values).view(prompts, kv_heads, beams, groups, new, dim)
        from_generated = weights[..., prompt_length:].reshape(*shape[:3], -1, generated)
        output = output + (from_generated @ generated_values).view(output.shape)
        return output.permute(0, 2, 4, 1, 3, 5).reshape(rows, new, heads, dim)


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' attention-interface signature; `key` and `value` are the cache's
    `_Layer` (its `update` returned them), so the attention reads both of its parts."""
    import torch

    scaling = scaling or query.size(-1) ** -0.5
    with torch.autocast(query.device.type, enabled=False):  # fp32 scores (see the cache)
        return key.cache.attention(query, key.index, scaling), None


AttentionInterface.register(ATTENTION, _attention)  # once, not at every decoding step


@contextmanager
def shared_prefix_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention reads a SharedPrefixCache while inside."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
