"""Hard recommendations: generate a title per user, ground it, rank the whole catalog."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RecommendConfig:
    """How recommendations are produced.

    num_beams: beam width of generation (1 = greedy). top: keep the first N items of
    each ranking (None = the full catalog). exclude_history: drop items the user
    already has in the prompt's history. precision: fp32 or bf16 autocast for
    generation (grounding embeddings are always fp32).
    """

    num_beams: int = 5
    batch_size: int = 16
    max_new_tokens: int | None = None
    top: int | None = None
    exclude_history: bool = False
    precision: str = "fp32"


@dataclass
class Ranked:
    """Per row: the generated text, whether it is exactly a catalog title, the ranking."""

    generations: list[str]
    grounded_exactly: list[bool]
    rankings: list[list[str]]

    @property
    def exact_matches(self) -> int:
        return sum(self.grounded_exactly)

    def by_user(self, rows: Sequence[SampleRow]) -> dict[str, list[str]]:
        return {row.user_id: items for row, items in zip(rows, self.rankings, strict=True)}


class Recommender:
    """A base model (+ LoRA adapter) ready to recommend: catalog embedded once, reused.

    The repair's guard re-ranks the same users many times with patched LoRA weights;
    grounding uses the base model only, so the catalog embeddings never change.
    """

    def __init__(self, model: Any, tokenizer: Any, bundle: Bundle, model_digest: str) -> None:
        from fudlr.models.lora import base_model_only
        from fudlr.recommender.grounding import catalog_embeddings

        self.model, self.tokenizer = model, tokenizer
        self.item_ids = list(bundle.items)
        self.item_texts = list(bundle.item_completions().values())
        self.catalog_texts = set(self.item_texts)
        self.device = next(model.parameters()).device
        with base_model_only(model):
            self.catalog = catalog_embeddings(model, tokenizer, model_digest, self.item_texts)
        self.longest_title = max(len(tokenizer(text)["input_ids"]) for text in self.item_texts)

    @classmethod
    def load(
        cls,
        base_model_dir: Path,
        adapter_dir: Path | None,
        bundle: Bundle,
        device: str = "auto",
        trainable: bool = False,
    ) -> Recommender:
        from fudlr.models.device import resolve_device
        from fudlr.models.lora import load_adapter
        from fudlr.models.store import load_base_model, model_digest

        base, tokenizer = load_base_model(base_model_dir, resolve_device(device))
        model = load_adapter(base, adapter_dir, trainable) if adapter_dir is not None else base
        return cls(model, tokenizer, bundle, model_digest(base_model_dir))

    def neighborhoods(self, k: int) -> dict[str, list[str]]:
        """Each catalog item's top-K list when a generation is exactly its title."""
        from fudlr.recommender.grounding import rank_by_distance

        order = rank_by_distance(self.catalog, self.catalog)[:, :k].tolist()
        return {
            item_id: [self.item_ids[index] for index in row]
            for item_id, row in zip(self.item_ids, order, strict=True)
        }

    def rank(
        self,
        rows: Sequence[SampleRow],
        config: RecommendConfig = RecommendConfig(),
        progress: Callable[[int], None] | None = None,
    ) -> Ranked:
        return self.rank_generations(rows, self.generate(rows, config, progress), config)

    def generate(
        self,
        rows: Sequence[SampleRow],
        config: RecommendConfig = RecommendConfig(),
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """One generated title per row (the expensive part of recommending)."""
        return [texts[0] for texts in self.generate_alternatives(rows, config, 1, progress)]

    def generate_alternatives(
        self,
        rows: Sequence[SampleRow],
        config: RecommendConfig = RecommendConfig(),
        count: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[str]]:
        """Per row, the `count` best beams' texts (None: all num_beams), best first: the
        titles the model nearly recommended, from the same beam search."""
        from fudlr.models.device import autocast
        from fudlr.recommender.generate import generate_completions

        with autocast(self.device, config.precision):
            return generate_completions(
                self.model,
                self.tokenizer,
                [row.prompt for row in rows],
                num_beams=config.num_beams,
                max_new_tokens=config.max_new_tokens or self.longest_title + 4,
                batch_size=config.batch_size,
                progress=progress,
                returns=count or config.num_beams,
            )

    def embed(self, generations: Sequence[str]) -> torch.Tensor:
        """Grounding embeddings of generations (base model only, like the catalog's)."""
        from fudlr.models.lora import base_model_only
        from fudlr.recommender.grounding import embed_texts

        with base_model_only(self.model):
            return embed_texts(self.model, self.tokenizer, list(generations))

    def rank_generations(
        self,
        rows: Sequence[SampleRow],
        generations: Sequence[str],
        config: RecommendConfig = RecommendConfig(),
        distance_scale: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> Ranked:
        """Ground generations to rankings of the catalog. `distance_scale` ([items], > 0)
        multiplies each item's distance: how a reranking baseline penalises item groups.
        `queries`: the generations' embeddings if already computed (`embed`), so that
        ranking the same generations many ways embeds them once."""
        from fudlr.recommender.grounding import rank_by_distance

        queries = self.embed(generations) if queries is None else queries
        order = rank_by_distance(queries, self.catalog, distance_scale)
        rankings = []
        for row, ranked in zip(rows, order.tolist(), strict=True):
            items = [self.item_ids[index] for index in ranked]
            if config.exclude_history:
                seen = set(row.history)
                items = [item for item in items if item not in seen]
            rankings.append(items[: config.top] if config.top is not None else items)
        exact = [generation in self.catalog_texts for generation in generations]
        return Ranked(list(generations), exact, rankings)


@dataclass
class RecommendReport:
    users: int
    seconds: float
    exact_matches: int


def one_row_per_user(bundle: Bundle, split: str) -> list[SampleRow]:
    """Recommendation lists are per user, so a split with repeated users cannot be used."""
    rows = bundle.split(split)
    seen: set[str] = set()
    for row in rows:
        if row.user_id in seen:
            raise InputError(
                f"split '{split}' has several rows for user '{row.user_id}'; "
                "recommendations need one row per user (use valid or test)",
                file=bundle.root / f"{split}.jsonl",
            )
        seen.add(row.user_id)
    return rows


def write_recommendations(path: Path, rows: Sequence[SampleRow], ranked: Ranked) -> None:
    """`{"user_id", "sample_id", "generation", "grounded_exactly", "items"}` per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        columns = zip(
            rows, ranked.generations, ranked.grounded_exactly, ranked.rankings, strict=True
        )
        for row, generation, exact, items in columns:
            record = {
                "user_id": row.user_id,
                "sample_id": row.sample_id,
                "generation": generation,
                "grounded_exactly": exact,
                "items": items,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(path)


def recommend(
    base_model_dir: Path,
    adapter_dir: Path | None,
    bundle: Bundle,
    split: str,
    out_path: Path,
    config: RecommendConfig = RecommendConfig(),
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> RecommendReport:
    """Rank the catalog for every row of `split` and write recommendations.jsonl."""
    rows = one_row_per_user(bundle, split)
    recommender = Recommender.load(base_model_dir, adapter_dir, bundle, device)
    started = time.perf_counter()
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, len(rows))

    ranked = recommender.rank(rows, config, advance)
    write_recommendations(out_path, rows, ranked)
    return RecommendReport(len(rows), time.perf_counter() - started, ranked.exact_matches)
