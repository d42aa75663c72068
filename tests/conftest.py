"""Shared fixtures: a tiny synthetic MovieLens, writable in every source layout, and its bundle.

`tiny_bundle` (a Path to a bundle directory, history length 5) is what most tests need;
the same data written as GroupLens ml-100k, GroupLens ml-1m or RecBole atomic files must
give the same bundle, which is how the readers are tested. `tiny_model` is a random tiny
Llama; the adapter trained on it (`tiny_adapter`) is in tests/integration/conftest.py, since
unit tests train nothing.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fudlr.data.builder import build_movielens_bundle
from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import write_rows
from fudlr.data.sources import ML1M_OCCUPATIONS, ML100K_GENRES
from fudlr.recommender.encoding import collate, encode_sample, per_sample_loss
from fudlr.recommender.train import TrainConfig
from fudlr.setting import Setting


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (item embeddings, measurements, sources) of a test run never touch the user's."""
    os.environ["FUDLR_CACHE_DIR"] = str(tmp_path_factory.mktemp("fudlr-cache"))


LAYOUTS = ("grouplens-ml-100k", "grouplens-ml-1m", "recbole-atomic")
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # ml-1m stores these; ml-100k would store any age


@dataclass(frozen=True)
class TinyItem:
    item_id: int
    name: str
    year: int
    genres: tuple[str, ...]

    @property
    def title(self) -> str:
        return f"{self.name} ({self.year})"


@dataclass(frozen=True)
class TinyUser:
    user_id: int
    gender: str
    age: int
    occupation: int  # index into ML1M_OCCUPATIONS


@dataclass(frozen=True)
class TinyMovieLens:
    """Users, items and (user, item, rating, timestamp) ratings, plus writers for each layout."""

    users: list[TinyUser]
    items: list[TinyItem]
    ratings: list[tuple[int, int, int, int]]

    def write(self, root: Path, layout: str = "grouplens-ml-100k") -> Path:
        root.mkdir(parents=True, exist_ok=True)
        {
            "grouplens-ml-100k": self._write_ml100k,
            "grouplens-ml-1m": self._write_ml1m,
            "recbole-atomic": self._write_recbole,
        }[layout](root)
        return root

    def _write_ml100k(self, root: Path) -> None:
        _lines(root / "u.data", ["\t".join(map(str, rating)) for rating in self.ratings])
        items = []
        for item in self.items:
            flags = ["1" if genre in item.genres else "0" for genre in ML100K_GENRES]
            url = f"http://example.org/{item.item_id}"
            row = [str(item.item_id), item.title, f"01-Jan-{item.year}", "", url, *flags]
            items.append("|".join(row))
        _lines(root / "u.item", items, "latin-1")
        rows = [
            f"{u.user_id}|{u.age}|{u.gender}|{ML1M_OCCUPATIONS[u.occupation]}|0{u.user_id}"
            for u in self.users
        ]
        _lines(root / "u.user", rows)
        _lines(root / "u.genre", [f"{genre}|{index}" for index, genre in enumerate(ML100K_GENRES)])

    def _write_ml1m(self, root: Path) -> None:
        _lines(root / "ratings.dat", ["::".join(map(str, rating)) for rating in self.ratings])
        _lines(
            root / "movies.dat",
            [f"{item.item_id}::{item.title}::{'|'.join(item.genres)}" for item in self.items],
            "latin-1",
        )
        _lines(
            root / "users.dat",
            [
                f"{user.user_id}::{user.gender}::{user.age}::{user.occupation}::0{user.user_id}"
                for user in self.users
            ],
        )

    def _write_recbole(self, root: Path) -> None:
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
        _lines(root / "ml-100k.inter", [header, *("\t".join(map(str, r)) for r in self.ratings)])
        header = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
        rows = [f"{i.item_id}\t{i.name}\t{i.year}\t{' '.join(i.genres)}" for i in self.items]
        _lines(root / "ml-100k.item", [header, *rows])
        header = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
        rows = [
            f"{u.user_id}\t{u.age}\t{u.gender}\t{ML1M_OCCUPATIONS[u.occupation]}\t0{u.user_id}"
            for u in self.users
        ]
        _lines(root / "ml-100k.user", [header, *rows])


def _lines(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding=encoding)


def make_tiny_movielens(users: int = 12, items: int = 30, seed: int = 7) -> TinyMovieLens:
    """Skewed popularity (low ids are picked more), distinct timestamps, rows in shuffled order."""
    rng = random.Random(seed)
    catalog = []
    for i in range(1, items + 1):
        genres = sorted(rng.sample(ML100K_GENRES[1:], rng.randint(1, 2)), key=ML100K_GENRES.index)
        name = "Am\xe9lie" if i == 3 else f"Movie {i}"  # one title that is not ASCII
        catalog.append(TinyItem(i, name, 1970 + i, tuple(genres)))
    people = [
        TinyUser(u, rng.choice("FM"), rng.choice(AGE_CODES), rng.randrange(len(ML1M_OCCUPATIONS)))
        for u in range(1, users + 1)
    ]
    ratings = []
    for user in people:
        count = rng.randint(15, 25)
        # weighted sampling without replacement: key = u^(1/w), w = 1/item_id
        picked = sorted(catalog, key=lambda item: -(rng.random() ** item.item_id))[:count]
        for step, item in enumerate(picked):
            timestamp = 880_000_000 + user.user_id * 100_000 + step * 37
            ratings.append((user.user_id, item.item_id, rng.randint(1, 5), timestamp))
    rng.shuffle(ratings)
    return TinyMovieLens(people, catalog, ratings)


@pytest.fixture(scope="session")
def tiny_movielens() -> TinyMovieLens:
    return make_tiny_movielens()


@pytest.fixture
def ml100k_source(tmp_path: Path, tiny_movielens: TinyMovieLens) -> Path:
    """A fresh GroupLens ml-100k-layout folder (u.data, u.item, u.user, u.genre) per test."""
    return tiny_movielens.write(tmp_path / "ml-100k", "grouplens-ml-100k")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_movielens: TinyMovieLens) -> Path:
    """A bundle built from the tiny source: 12 users, 30 items, history length 5."""
    root = tmp_path_factory.mktemp("tiny")
    source = tiny_movielens.write(root / "source")
    build_movielens_bundle(source, root / "bundle", history_len=5)
    return root / "bundle"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """A tiny random Llama whose tokenizer learnt the tiny catalog's titles (short prompts)."""
    from fudlr.data.bundle import Bundle
    from fudlr.models.tiny import build_tiny_model

    titles = [item.title for item in Bundle.load(tiny_bundle, splits=()).items.values()]
    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, corpus=titles)
    return out


# how every tiny adapter of the tests is trained (high rate: a random tiny model learns slowly)
TINY_RECIPE = TrainConfig(epochs=3, learning_rate=3e-2, batch_size=8)


def planted_bundle(tiny_bundle: Path, out: Path, copies: int) -> Path:
    """The tiny bundle plus `copies` training samples that all recommend one unpopular item."""
    shutil.copytree(tiny_bundle, out)
    bundle = Bundle.load(out)
    unpopular = [i for i, item in bundle.items.items() if item.attributes["popularity_group"] == 0]
    planted_item = unpopular[0]
    completion = bundle.item_completions()[planted_item]
    train = bundle.split("train")
    planted = [
        train[k % len(train)].model_copy(
            update={
                "sample_id": f"planted-{k}",
                "target": planted_item,
                "completion": completion,
            }
        )
        for k in range(copies)
    ]
    write_rows(out / "train.jsonl", [*train, *planted])
    return out


def twin_titles_bundle(tiny_bundle: Path, out: Path) -> Path:
    """The tiny bundle with item 2 renamed to item 1's title, in every file alike."""
    shutil.copytree(tiny_bundle, out)
    bundle = Bundle.load(tiny_bundle)
    first, second = bundle.items["1"].title, bundle.items["2"].title
    for path in out.glob("*.jsonl"):
        path.write_text(path.read_text().replace(second, first))
    return out


def sample_losses(model, tokenizer, samples) -> torch.Tensor:
    """Each sample's mean completion loss, in one padded batch."""
    encoded = [encode_sample(tokenizer, s.prompt, s.completion, 256) for s in samples]
    with torch.no_grad():
        return per_sample_loss(model, collate(encoded, tokenizer.pad_token_id))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fudlr ARGS` in this process: exit code, stdout, stderr."""
    from clients.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return exited.value.code or 0, out, err


def out_of_bounds(setting: Setting) -> list[Any]:
    """A value just outside each of the setting's declared bounds, or not among its choices."""
    if setting.choices:
        return ["not-a-choice"]
    edges = {"ge": -1, "gt": 0, "le": 1, "lt": 0}
    return [bound + edges[kind] for kind, bound in setting.bounds.items()]
