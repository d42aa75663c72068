"""Turn a MovieLens source into a data bundle: split, groups, rendered texts (the format:
docs/method.md, "The data bundle").

Protocol (BIGRec / IFairLRS style): each user's interactions ordered by time, last one
-> test, second last -> valid, sliding windows over the rest -> train. Everything is
deterministic (ties broken by item id, a seeded subset, sorted keys, no timestamps), so
the same command writes byte-identical files: influence scores and caches key on them.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fudlr.console import console, progress_bar
from fudlr.data.bundle import Bundle
from fudlr.data.fetch import fetch_ml100k
from fudlr.data.jsonl import write_rows
from fudlr.data.prompts import MOVIES
from fudlr.data.schema import ItemRow, SampleRow, UserRow
from fudlr.data.sources import Source, read_source
from fudlr.errors import InputError

POPULARITY_GROUPS = 5
PROTOCOL = (
    "items that share a title are merged into the smallest id (a user's repeat keeps "
    "its first interaction); per user, interactions with rating >= min_rating ordered by "
    "(timestamp, item id): "
    "last -> test, second last -> valid, sliding windows over the rest -> train; "
    "a sample's history is up to history_len items right before its target; "
    "users with fewer than 3 interactions have no valid/test sample"
)
Sample = tuple[str, int, list[int], int]  # (sample_id, user id, history item ids, target item id)
# Upper bounds (exclusive) of the age buckets of ml-1m's README, used for both datasets.
AGE_GROUPS = (
    (18, "<18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
)


@dataclass(frozen=True)
class BundleSummary:
    """What a build wrote, for the CLI's table and for scripts that chain steps."""

    out_dir: Path
    name: str
    layout: str
    counts: dict[str, int]  # items, users, train, valid, test, users_skipped
    train_available: int  # windows before --train-size subsampling
    popularity_sizes: list[int]
    popularity_thresholds: list[int]


@dataclass(frozen=True)
class UserSplit:
    """One user's item ids in time order, cut into the training portion and the held-out pair."""

    user_id: int
    portion: list[int]
    held_out: list[int]  # [valid, test]; empty for users with fewer than 3 interactions


def age_group(age: int) -> str:
    return next((label for bound, label in AGE_GROUPS if age < bound), "56+")


def merge_duplicate_titles(source: Source) -> tuple[Source, dict[int, int]]:
    """One item per title: MovieLens lists some films twice under two ids. A recommender
    that outputs titles cannot tell such items apart (grounding always picks one,
    constrained decoding cannot reach both), so each duplicate's interactions go to the
    title's smallest id, and a user's repeat of the same film keeps its first rating.
    Returns the merged source and {duplicate id: kept id}."""
    kept: dict[str, int] = {}
    merged: dict[int, int] = {}
    for item_id in sorted(source.items):
        title = source.items[item_id].title
        if title in kept:
            merged[item_id] = kept[title]
        else:
            kept[title] = item_id
    if not merged:
        return source, merged
    ordered = sorted(source.interactions, key=lambda x: (x.user_id, x.timestamp, x.item_id))
    interactions, seen = [], set()
    for interaction in ordered:
        item_id = merged.get(interaction.item_id, interaction.item_id)
        if (interaction.user_id, item_id) in seen:
            continue
        seen.add((interaction.user_id, item_id))
        interactions.append(replace(interaction, item_id=item_id))
    items = {item_id: item for item_id, item in source.items.items() if item_id not in merged}
    return replace(source, items=items, interactions=interactions), merged


def split_users(source: Source, min_rating: float) -> list[UserSplit]:
    """Order each user's interactions by (timestamp, item id) and cut off the last two."""
    by_user = defaultdict(list)
    for interaction in source.interactions:
        if interaction.rating >= min_rating:
            by_user[interaction.user_id].append(interaction)
    splits = []
    for user_id in sorted(source.users):
        ordered = sorted(by_user[user_id], key=lambda x: (x.timestamp, x.item_id))
        sequence = [interaction.item_id for interaction in ordered]
        if len(sequence) >= 3:
            splits.append(UserSplit(user_id, sequence[:-2], sequence[-2:]))
        else:
            splits.append(UserSplit(user_id, sequence, []))
    return splits


def popularity_groups(
    item_ids: list[int], counts: Counter[int], groups: int = POPULARITY_GROUPS
) -> dict[int, int]:
    """Item -> group 0 (least popular) .. groups-1, near-equal sizes as numpy.array_split."""
    ranked = sorted(item_ids, key=lambda item_id: (counts[item_id], item_id))
    size, extra = divmod(len(ranked), groups)
    assignment, start = {}, 0
    for group in range(groups):
        end = start + size + (1 if group < extra else 0)
        assignment.update((item_id, group) for item_id in ranked[start:end])
        start = end
    return assignment


def train_windows(
    splits: list[UserSplit], history_len: int, latest_per_user: int | None = None
) -> Iterator[Sample]:
    """(sample_id, user, history, target) for every position t >= 1 of every training
    portion, or only each user's `latest_per_user` last ones (closest in time to valid/test)."""
    for split in splits:
        first = 1 if latest_per_user is None else max(1, len(split.portion) - latest_per_user)
        for t in range(first, len(split.portion)):
            history = split.portion[max(0, t - history_len) : t]
            yield f"train-{split.user_id}-{t}", split.user_id, history, split.portion[t]


def held_out_samples(splits: list[UserSplit], history_len: int, position: int) -> Iterator[Sample]:
    """Valid (position 0) or test (1) samples; their history runs right up to the target."""
    name = ("valid", "test")[position]
    for split in splits:
        if split.held_out:
            before = split.portion + split.held_out[:position]
            history = before[-history_len:]
            yield f"{name}-{split.user_id}", split.user_id, history, split.held_out[position]


def build_bundle(
    source: Source,
    out_dir: str | Path,
    *,
    train_size: int | None = None,
    seed: int = 0,
    history_len: int = 10,
    min_rating: float = 0,
    latest_per_user: int | None = None,
    verbose: bool = False,
) -> BundleSummary:
    """Write items, users, the three splits and meta.json to `out_dir`, then load it back."""
    if history_len < 1:
        raise InputError(f"history length must be at least 1, got {history_len}")
    if train_size is not None and train_size < 1:
        raise InputError(f"train size must be at least 1, got {train_size}")
    if latest_per_user is not None and latest_per_user < 1:
        raise InputError(f"latest windows per user must be at least 1, got {latest_per_user}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source, merged = merge_duplicate_titles(source)
    splits = split_users(source, min_rating)
    counts = Counter(item_id for split in splits for item_id in split.portion)
    item_ids = sorted(source.items)
    groups = popularity_groups(item_ids, counts)
    titles = {item_id: item.title for item_id, item in source.items.items()}

    write_rows(out / "items.jsonl", (_item_row(source, i, counts[i], groups[i]) for i in item_ids))
    write_rows(
        out / "users.jsonl", (_user_row(source, user_id) for user_id in sorted(source.users))
    )
    available = sum(
        min(max(len(split.portion) - 1, 0), latest_per_user or len(split.portion))
        for split in splits
    )
    keep = _train_subset(available, train_size, seed)
    if verbose and train_size is not None and train_size >= available:
        console.print(f"--train-size {train_size} >= {available:,} windows: keeping them all")
    windows = (
        w
        for i, w in enumerate(train_windows(splits, history_len, latest_per_user))
        if keep is None or i in keep
    )
    total = available if keep is None else len(keep)
    rows = _tracked((_sample(w, titles) for w in windows), total, verbose)
    written = {"train": write_rows(out / "train.jsonl", rows)}
    for position, name in enumerate(("valid", "test")):
        samples = held_out_samples(splits, history_len, position)
        written[name] = write_rows(out / f"{name}.jsonl", (_sample(s, titles) for s in samples))

    group_sizes = Counter(groups.values())
    summary = BundleSummary(
        out_dir=out,
        name=source.name,
        layout=source.layout,
        counts={
            "items": len(source.items),
            "users": len(source.users),
            **written,
            "users_skipped": sum(1 for split in splits if not split.held_out),
        },
        train_available=available,
        popularity_sizes=[group_sizes[k] for k in range(POPULARITY_GROUPS)],
        popularity_thresholds=[
            max((counts[i] for i in item_ids if groups[i] == k), default=0)
            for k in range(POPULARITY_GROUPS)
        ],
    )
    meta = _meta(source, summary, train_size, seed, history_len, min_rating)
    meta["protocol"]["latest_per_user"] = latest_per_user
    meta["protocol"]["merged_duplicate_titles"] = {str(k): str(v) for k, v in merged.items()}
    _write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False))
    with console.status("checking the bundle loads", spinner="dots") if verbose else nullcontext():
        Bundle.load(out)  # the bundle we hand out must pass the loader's checks
    return summary


def build_movielens_bundle(
    source: str | Path | None,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    train_size: int | None = None,
    seed: int = 0,
    history_len: int = 10,
    min_rating: float = 0,
    latest_per_user: int | None = None,
    verbose: bool = False,
) -> BundleSummary:
    """Build a bundle from a source folder in any layout, or (source=None) the recbole ML-100K.

    dataset: the dataset the source must hold ("movielens-100k", "movielens-1m"); None
    accepts whatever the folder holds.
    """
    if source is None:
        folder, provenance = fetch_ml100k(verbose)
        data = read_source(folder)
        data.provenance.update(provenance)
    else:
        data = read_source(source)
    if dataset is not None and data.name != dataset:
        raise InputError(
            f"expected {dataset} files, found {data.name} ({data.layout})", file=source
        )
    if verbose:
        console.print(
            f"read {len(data.interactions):,} interactions of {len(data.users):,} users "
            f"on {len(data.items):,} items ({data.layout})"
        )
    return build_bundle(
        data,
        out_dir,
        train_size=train_size,
        seed=seed,
        history_len=history_len,
        min_rating=min_rating,
        latest_per_user=latest_per_user,
        verbose=verbose,
    )


def _train_subset(available: int, train_size: int | None, seed: int) -> set[int] | None:
    """Indices of the windows kept: a seeded sample, so the subset depends on nothing else."""
    if train_size is None or train_size >= available:
        return None
    return set(random.Random(seed).sample(range(available), train_size))


def _tracked(rows: Iterator[SampleRow], total: int, verbose: bool) -> Iterator[SampleRow]:
    """Pass rows through, moving a progress bar when verbose: ML-1M has a million of them."""
    if not verbose:
        yield from rows
        return
    with progress_bar("train.jsonl", total=total) as progress:
        task = progress.tasks[0].id
        for count, row in enumerate(rows, start=1):
            yield row
            if count % 1000 == 0 or count == total:
                progress.update(task, completed=count)


def _item_row(source: Source, item_id: int, interactions: int, group: int) -> ItemRow:
    item = source.items[item_id]
    attributes = {
        "genres": list(item.genres),
        "year": item.year,
        "interactions": interactions,
        "popularity_group": group,
    }
    return ItemRow(item_id=str(item_id), title=item.title, attributes=attributes)


def _user_row(source: Source, user_id: int) -> UserRow:
    user = source.users[user_id]
    attributes = {
        "gender": user.gender,
        "age": user.age,
        "age_group": age_group(user.age),
        "occupation": user.occupation,
    }
    return UserRow(user_id=str(user_id), attributes=attributes)


def _sample(sample: Sample, titles: dict[int, str]) -> SampleRow:
    sample_id, user_id, history, target = sample
    return SampleRow(
        sample_id=sample_id,
        user_id=str(user_id),
        history=[str(item_id) for item_id in history],
        target=str(target),
        prompt=MOVIES.prompt([titles[item_id] for item_id in history]),
        completion=MOVIES.completion(titles[target]),
    )


def _meta(
    source: Source,
    summary: BundleSummary,
    train_size: int | None,
    seed: int,
    history_len: int,
    min_rating: float,
) -> dict[str, Any]:
    genders = Counter(user.gender for user in source.users.values())
    return {
        "name": source.name,
        "source": {"layout": source.layout, "files": source.files, **source.provenance},
        "protocol": {
            "description": PROTOCOL,
            "history_len": history_len,
            "min_rating": min_rating,
            "seed": seed,
            "train_size": {
                "requested": train_size,
                "actual": summary.counts["train"],
                "available": summary.train_available,
            },
        },
        "template": MOVIES.describe(),
        "groups": {
            "popularity_group": {
                "attribute": "popularity_group",
                "kind": "item",
                "groups": POPULARITY_GROUPS,
                "values": list(range(POPULARITY_GROUPS)),
                "sizes": summary.popularity_sizes,
                "interaction_thresholds": summary.popularity_thresholds,
                "description": (
                    "items sorted by (interactions in the training portions, item id), split "
                    "into near-equal groups; 0 = least popular; interaction_thresholds = the "
                    "largest count in each group"
                ),
            },
            "gender": {
                "attribute": "gender",
                "kind": "user",
                "groups": len(genders),
                "values": sorted(genders),
                "sizes": [genders[gender] for gender in sorted(genders)],
                "description": "users grouped by their gender attribute",
            },
        },
        "counts": summary.counts,
    }


def _write_text(path: Path, text: str) -> None:
    """Temp file + rename, like write_rows, so a reader never sees half a meta.json."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n", encoding="utf-8", newline="\n")
    temporary.replace(path)
