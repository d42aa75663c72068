"""A tiny synthetic MovieLens, writable in every source layout the readers accept.

Tests and the tiny-model benchmarks need a catalog with skewed popularity and users with
demographics, built offline in milliseconds; `fudlr.models.tiny` is the model to go with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from fudlr.data.sources import ML1M_OCCUPATIONS, ML100K_GENRES

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
