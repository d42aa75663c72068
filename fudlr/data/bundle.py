"""Load and cross-check a data bundle directory (docs/method.md, "The data bundle")."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fudlr.data.jsonl import iter_rows
from fudlr.data.schema import SPLITS, ItemRow, SampleRow, UserRow
from fudlr.errors import InputError

BUNDLE_FILES = ("items.jsonl", "users.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl")


@dataclass
class Bundle:
    """A validated bundle: catalog, users and the splits, with every reference checked."""

    root: Path
    meta: dict
    items: dict[str, ItemRow]
    users: dict[str, UserRow]
    splits: dict[str, list[SampleRow]] = field(repr=False)

    @classmethod
    def load(cls, root: str | Path, splits: tuple[str, ...] = SPLITS) -> Bundle:
        """Read `root`; a split file that is absent is an error only if asked for in `splits`."""
        root = Path(root)
        if not root.is_dir():
            raise InputError("bundle directory not found", file=root)
        items = _load_unique(root / "items.jsonl", ItemRow, "item_id")
        users = _load_unique(root / "users.jsonl", UserRow, "user_id")
        loaded = {name: _load_split(root / f"{name}.jsonl", items, users) for name in splits}
        meta_path = root / "meta.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        return cls(root=root, meta=meta, items=items, users=users, splits=loaded)

    def split(self, name: str) -> list[SampleRow]:
        if name not in self.splits:
            raise InputError(f"split '{name}' was not loaded (have: {', '.join(self.splits)})")
        return self.splits[name]

    def item_completions(self) -> dict[str, str]:
        """Every catalog item as the completion text the model was tuned to emit.

        The format (e.g. the title in quotes) is read off the loaded samples, so a bundle
        rendered with any template grounds and scores titles exactly as it was trained.
        """
        prefix, suffix = self._completion_format()
        return {item_id: f"{prefix}{item.title}{suffix}" for item_id, item in self.items.items()}

    def _completion_format(self) -> tuple[str, str]:
        found: tuple[str, str] | None = None
        for name, samples in self.splits.items():
            for sample in samples:
                title = self.items[sample.target].title
                start = sample.completion.find(title)
                if start < 0:
                    raise InputError(
                        f"completion of sample '{sample.sample_id}' does not contain the "
                        f"target's title '{title}'",
                        file=self.root / f"{name}.jsonl",
                        field="completion",
                    )
                fmt = (sample.completion[:start], sample.completion[start + len(title) :])
                if found is None:
                    found = fmt
                elif fmt != found:
                    raise InputError(
                        f"sample '{sample.sample_id}' wraps its title as {fmt!r}, "
                        f"others as {found!r}; completions must share one format",
                        file=self.root / f"{name}.jsonl",
                        field="completion",
                    )
        if found is None:
            raise InputError("no samples loaded to read the completion format from", file=self.root)
        return found

    def digest(self, names: tuple[str, ...] = BUNDLE_FILES) -> str:
        """sha256 over the named files, so caches and indexes can tell a bundle changed."""
        hasher = hashlib.sha256()
        for name in names:
            path = self.root / name
            hasher.update(name.encode())
            hasher.update(path.read_bytes() if path.is_file() else b"<absent>")
        return hasher.hexdigest()


def subset(rows: Sequence[SampleRow], count: int | None, seed: int) -> list[SampleRow]:
    """A fixed-seed subset of `count` rows in their original order (None = all): the same
    users wherever the same split, count and seed are asked for."""
    if count is None or count >= len(rows):
        return list(rows)
    chosen = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[index] for index in chosen]


def _load_unique(path: Path, schema: type, key: str) -> dict:
    rows: dict = {}
    for line, row in iter_rows(path, schema):
        row_id = getattr(row, key)
        if row_id in rows:
            raise InputError(f"duplicate {key} '{row_id}'", file=path, line=line, field=key)
        rows[row_id] = row
    if not rows:
        raise InputError("file has no rows", file=path)
    return rows


def _load_split(
    path: Path, items: dict[str, ItemRow], users: dict[str, UserRow]
) -> list[SampleRow]:
    samples: list[SampleRow] = []
    seen: set[str] = set()
    for line, sample in iter_rows(path, SampleRow):
        if sample.sample_id in seen:
            raise InputError(
                f"duplicate sample_id '{sample.sample_id}'", file=path, line=line, field="sample_id"
            )
        seen.add(sample.sample_id)
        if sample.user_id not in users:
            raise InputError(
                f"unknown user '{sample.user_id}'", file=path, line=line, field="user_id"
            )
        if sample.target not in items:
            raise InputError(
                f"unknown item '{sample.target}'", file=path, line=line, field="target"
            )
        for position, item_id in enumerate(sample.history):
            if item_id not in items:
                raise InputError(
                    f"unknown item '{item_id}'", file=path, line=line, field=f"history.{position}"
                )
        samples.append(sample)
    return samples
