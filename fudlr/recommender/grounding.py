"""Ground free-text generations to catalog items (BIGRec / IFairLRS protocol).

Both the generation and every item's completion text are embedded with the *base*
model (last layer, last token); items are ranked by L2 distance. Item embeddings
depend only on the base model and the catalog, so they are cached on disk by digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fudlr.paths import cache_dir
from fudlr.recommender.generate import left_pad

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def embed_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Last-layer hidden state of each text's last token, shape [len(texts), hidden]."""
    import torch

    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, add_special_tokens=True)["input_ids"] or [tokenizer.eos_token_id]
            for text in texts[start : start + batch_size]
        ]
        input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            output = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
            )
        chunks.append(output.hidden_states[-1][:, -1, :].float().cpu())
    return torch.cat(chunks)


def catalog_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_digest: str,
    item_texts: Sequence[str],
    cache: Path | None = None,
) -> torch.Tensor:
    """Embeddings of the catalog's completion texts, cached per (base model, texts)."""
    from safetensors.torch import load_file, save_file

    texts_digest = hashlib.sha256("\n".join(item_texts).encode()).hexdigest()
    folder = cache or cache_dir() / "item-embeddings"
    path = folder / f"{model_digest[:16]}-{texts_digest[:16]}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"]
    embeddings = embed_texts(model, tokenizer, item_texts)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file({"embeddings": embeddings.contiguous()}, str(temporary))
    temporary.replace(path)
    return embeddings


def rank_by_distance(
    queries: torch.Tensor, catalog: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Catalog indices per query, nearest first; ties keep catalog order (stable sort).
    `scale` ([items]) multiplies each catalog item's distance (1 = unchanged)."""
    import torch

    distances = torch.cdist(queries.double(), catalog.double(), p=2)
    if scale is not None:
        distances = distances * scale.double()[None, :]
    return torch.sort(distances, dim=1, stable=True).indices
