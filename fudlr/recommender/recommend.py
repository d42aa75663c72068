"""Hard recommendations: each user's top-K catalog items, by one of two decodings.

constrained: beam search restricted to the catalog's titles returns the K items the
model scores highest (the model's own ranking). grounded: generate one free-text title
and rank the whole catalog by its distance to it (the BIGRec / IFairLRS protocol, kept
to compare with those papers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fudlr.data.bundle import Bundle, subset
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.models.device import PRECISIONS, Precision
from fudlr.setting import check, setting

if TYPE_CHECKING:
    import torch

    from fudlr.recommender.constrained import ConstrainedSearch


class Decoding(StrEnum):
    """How a user's list is decoded from the model."""

    CONSTRAINED = "constrained"
    GROUNDED = "grounded"


# the list length of constrained decoding when none is asked for: the deepest K reported
CONSTRAINED_TOP = 10


@dataclass(frozen=True)
class RecommendConfig:
    """How recommendations are produced.

    The fields with a `setting` are the ones a debias job takes (decoding, num_beams,
    precision). batch_size: prompts generated at once. top: keep the first N items of
    each list (None = the full catalog under grounding, CONSTRAINED_TOP under constrained
    decoding). exclude_history: never recommend an item already in the user's history
    (None: yes under constrained decoding, no under grounding, whose protocol ranks the
    whole catalog). length_normalization: constrained decoding ranks by the mean instead
    of the sum of token log-probabilities.
    """

    decoding: Decoding = field(
        default=Decoding.CONSTRAINED,
        metadata=setting(
            "How the lists are decoded: constrained (the K best catalog items by beam search "
            "over the titles) or grounded (one generated title, the catalog ranked by "
            "distance to it, BIGRec)"
        ),
    )
    num_beams: int = field(
        default=5,
        metadata=setting(
            "Beam width (constrained decoding uses at least the list's length; grounded: "
            "1 = greedy)",
            ge=1,
        ),
    )
    batch_size: int = 16
    max_new_tokens: int | None = None
    top: int | None = None
    exclude_history: bool | None = None
    length_normalization: bool = False
    precision: Precision = field(
        default="fp32",
        metadata=setting(
            "fp32, or bf16 autocast for generation (grounding's embeddings stay fp32)",
            choices=PRECISIONS,
        ),
    )

    def __post_init__(self) -> None:
        check(self)

    @property
    def excludes_history(self) -> bool:
        if self.exclude_history is None:
            return self.decoding == Decoding.CONSTRAINED
        return self.exclude_history

    @property
    def list_length(self) -> int | None:
        """Items per user's list: None is the whole catalog (grounding only)."""
        if self.decoding == Decoding.CONSTRAINED:
            return self.top or CONSTRAINED_TOP
        return self.top


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
    """A base model (+ LoRA adapter) ready to recommend: the catalog prepared once, reused.

    The repair's guard re-ranks the same users many times with patched LoRA weights, so
    the catalog's title tree (constrained) and its embeddings (grounded: base model only,
    so they never change) are built on first use and kept.
    """

    def __init__(self, model: Any, tokenizer: Any, bundle: Bundle, model_digest: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.model_digest = model_digest
        self.item_ids = list(bundle.items)
        self.item_texts = list(bundle.item_completions().values())
        if not self.item_ids:
            raise InputError("the catalog is empty: there is nothing to recommend")
        self.item_index = {item_id: index for index, item_id in enumerate(self.item_ids)}
        self.catalog_texts = set(self.item_texts)
        self.device = next(model.parameters()).device
        self.longest_title = max(len(tokenizer(text)["input_ids"]) for text in self.item_texts)

    @cached_property
    def catalog(self) -> torch.Tensor:
        """Grounding embeddings of every item's completion text (base model only)."""
        from fudlr.models.lora import base_model_only
        from fudlr.recommender.grounding import catalog_embeddings

        with base_model_only(self.model):
            return catalog_embeddings(
                self.model, self.tokenizer, self.model_digest, self.item_texts
            )

    @cached_property
    def title_search(self) -> ConstrainedSearch:
        """The catalog's prefix tree for constrained decoding."""
        from fudlr.recommender.constrained import ConstrainedSearch, TitleTree
        from fudlr.recommender.encoding import encode_completion

        sequences = [encode_completion(self.tokenizer, text) for text in self.item_texts]
        tree = TitleTree.build(sequences, self.item_ids, self.tokenizer.eos_token_id)
        return ConstrainedSearch(tree)

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
        """Every row's list, by the config's decoding."""
        if config.decoding == Decoding.CONSTRAINED:
            return self.rank_constrained(rows, config, progress)
        return self.rank_generations(rows, self.generate(rows, config, progress), config)

    def rank_constrained(
        self,
        rows: Sequence[SampleRow],
        config: RecommendConfig = RecommendConfig(),
        progress: Callable[[int], None] | None = None,
    ) -> Ranked:
        """Each row's `list_length` best catalog items by constrained beam search; the
        "generation" of a row is its first item's title (always a catalog title)."""
        import torch

        from fudlr.models.device import autocast
        from fudlr.recommender.encoding import encode_prompt
        from fudlr.recommender.generate import left_pad

        top = config.list_length
        assert top is not None
        search = self.title_search
        prompts = [encode_prompt(self.tokenizer, row.prompt) for row in rows]
        # prompts of similar length together: less left padding to run through the model
        order = sorted(range(len(rows)), key=lambda index: len(prompts[index]))
        lists: dict[int, list[tuple[int, float]]] = {}
        for start in range(0, len(rows), config.batch_size):
            positions = order[start : start + config.batch_size]
            chunk = [rows[index] for index in positions]
            input_ids, attention_mask = left_pad(
                [prompts[index] for index in positions], self.tokenizer.pad_token_id
            )
            excluded = None
            if config.excludes_history:
                excluded = [
                    [self.item_index[item] for item in row.history if item in self.item_index]
                    for row in chunk
                ]
            with torch.no_grad(), autocast(self.device, config.precision):
                found = search.search(
                    self.model,
                    input_ids.to(self.device),
                    attention_mask.to(self.device),
                    top=top,
                    num_beams=config.num_beams,
                    excluded=excluded,
                    length_normalization=config.length_normalization,
                )
            lists.update(zip(positions, found, strict=True))
            if progress is not None:
                progress(len(chunk))
        rankings = [[self.item_ids[item] for item, _ in lists[row]] for row in range(len(rows))]
        generations = [self.item_texts[lists[row][0][0]] for row in range(len(rows))]
        return Ranked(generations, [True] * len(rows), rankings)

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
            if config.excludes_history:
                seen = set(row.history)
                items = [item for item in items if item not in seen]
            rankings.append(items[: config.top] if config.top is not None else items)
        exact = [generation in self.catalog_texts for generation in generations]
        return Ranked(list(generations), exact, rankings)


def check_decodable(bundle: Bundle, config: RecommendConfig, split: str = "valid") -> None:
    """Refuse, before any model is loaded, what constrained decoding cannot do on this
    bundle: titles it could not tell apart, lists longer than the items a user can get."""
    if config.decoding != Decoding.CONSTRAINED:
        return
    items_file = bundle.root / "items.jsonl"
    if not bundle.items:
        raise InputError("the catalog is empty: there is nothing to recommend", file=items_file)
    owner: dict[str, str] = {}
    for item_id, item in bundle.items.items():
        if item.title in owner:
            raise InputError(
                f"items '{owner[item.title]}' and '{item_id}' share the title {item.title!r}: "
                "constrained decoding cannot tell them apart (merge them or make the titles "
                "distinct)",
                file=items_file,
                field="title",
            )
        owner[item.title] = item_id
    longest = max((len(set(row.history)) for row in bundle.split(split)), default=0)
    reachable = len(bundle.items) - (longest if config.excludes_history else 0)
    top = config.list_length or 0
    if top > reachable:
        raise InputError(
            f"lists of {top} items cannot be filled: a user of split '{split}' can get only "
            f"{reachable} of the catalog's {len(bundle.items)} items (history excluded)",
            field="top",
        )


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
    users: int | None = None,
    seed: int = 0,
) -> RecommendReport:
    """Rank the catalog for every row of `split` (or a fixed-seed subset of `users` of them:
    `subset`, so `fudlr metrics` can evaluate the same users) and write
    recommendations.jsonl."""
    rows = subset(one_row_per_user(bundle, split), users, seed)
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
