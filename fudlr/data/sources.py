"""Read MovieLens in the layouts it is found in: RecBole atomic files, GroupLens ml-100k and ml-1m.

Every layout is three delimited tables (interactions, items, users); only the file names,
separators, encodings and a few column conventions differ. So one table reader does the
parsing and checking (every error names the file, the line and the column), and each
layout only says how a raw row becomes an `Item`, a `User` or an `Interaction`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from fudlr.errors import InputError
from fudlr.hashing import file_sha256

# Genre flags of GroupLens' u.item, in column order, for when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# Occupation codes of ml-1m's users.dat (its README), so both datasets use names.
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip

_TITLE_YEAR = re.compile(r"\((\d{4})\)$")
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass(frozen=True, slots=True)
class Item:
    item_id: int
    title: str
    genres: tuple[str, ...]
    year: int | None


@dataclass(frozen=True, slots=True)
class User:
    user_id: int
    gender: str
    age: int
    occupation: str


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: int
    item_id: int
    rating: float
    timestamp: float


@dataclass
class Source:
    """A dataset in memory, cross-checked: every interaction names a known user and item."""

    layout: str
    name: str
    files: dict[str, str]  # file name -> sha256, recorded in meta.json
    items: dict[int, Item]
    users: dict[int, User]
    interactions: list[Interaction]
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawRow:
    """One line of a table by column name; parsing helpers raise errors that locate the value."""

    path: Path
    line: int
    values: dict[str, str]

    def error(self, message: str, column: str | None = None) -> InputError:
        return InputError(message, file=self.path, line=self.line, field=column)

    def text(self, column: str) -> str:
        return self.values[column].strip()

    def integer(self, column: str) -> int:
        value = self.text(column)
        try:
            return int(value)
        except ValueError:
            raise self.error(f"expected an integer, got '{value}'", column) from None

    def number(self, column: str) -> float:
        value = self.text(column)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise self.error(f"expected a number, got '{value}'", column)
        return number


@dataclass(frozen=True)
class Table:
    """Where a table lives and how it is split into columns.

    columns=None: a RecBole atomic file, whose header line names the columns; it must
    name at least `required`.
    """

    file: str
    sep: str
    columns: tuple[str, ...] | None
    encoding: str = "utf-8"
    required: tuple[str, ...] = ()


def read_table(root: Path, table: Table) -> Iterator[RawRow]:
    """Yield the non-blank lines of a table, checking each has exactly the expected columns."""
    path = root / table.file
    if not path.is_file():
        raise InputError("file not found", file=path)
    with path.open("rb") as handle:
        lines = (
            (number, _decode(path, number, raw, table.encoding))
            for number, raw in enumerate(handle, 1)
        )
        columns = table.columns or _recbole_header(path, next(lines, (1, ""))[1], table.required)
        for number, text in lines:
            if not text.strip():
                continue
            values = text.split(table.sep)
            if len(values) != len(columns):
                raise InputError(
                    f"expected {len(columns)} columns separated by {table.sep!r}, "
                    f"found {len(values)}",
                    file=path,
                    line=number,
                )
            yield RawRow(path, number, dict(zip(columns, values, strict=True)))


def _decode(path: Path, number: int, raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"not valid {encoding} text", file=path, line=number) from None


def _recbole_header(path: Path, header: str, required: tuple[str, ...]) -> tuple[str, ...]:
    """Column names of a RecBole atomic file: its first line, `name:type` separated by tabs."""
    columns = tuple(part.split(":", 1)[0].strip() for part in header.split("\t"))
    missing = [column for column in required if column not in columns]
    if missing:
        raise InputError(f"RecBole header lacks column(s) {', '.join(missing)}", file=path, line=1)
    return columns


def title_year(title: str) -> int | None:
    """The year a MovieLens title ends with, e.g. 1995 for 'Toy Story (1995)'."""
    match = _TITLE_YEAR.search(title)
    return int(match.group(1)) if match else None


def _item_title(row: RawRow, column: str) -> str:
    title = row.text(column)
    if not title:
        raise row.error("empty title", column)
    return title


# ----------------------------------------------------------------------------- row parsers


def _interaction(row: RawRow) -> Interaction:
    return Interaction(
        user_id=row.integer("user_id"),
        item_id=row.integer("item_id"),
        rating=row.number("rating"),
        timestamp=row.number("timestamp"),
    )


def _user(row: RawRow) -> User:
    gender = row.text("gender").upper()
    if gender not in ("F", "M"):
        raise row.error(f"expected gender F or M, got '{row.text('gender')}'", "gender")
    return User(row.integer("user_id"), gender, row.integer("age"), row.text("occupation"))


def _ml1m_user(row: RawRow) -> User:
    """users.dat stores the occupation as a code; name it as ml-100k does."""
    code = row.integer("occupation")
    if not 0 <= code < len(ML1M_OCCUPATIONS):
        raise row.error(f"unknown occupation code {code} (expected 0-20)", "occupation")
    return replace(_user(row), occupation=ML1M_OCCUPATIONS[code])


def _recbole_item(row: RawRow) -> Item:
    """RecBole splits the year off the title; put it back unless the name already carries one.

    Its ml-100k has 'unkonwn' as title and year of item 267 and year 'V' for item 1412,
    whose name already ends with '(1995)': a year that is not four digits is ignored.
    """
    name = _item_title(row, "movie_title")
    year_text = row.text("release_year")
    year = int(year_text) if re.fullmatch(r"\d{4}", year_text) else None
    title = name if year is None or title_year(name) else f"{name} ({year})"
    genres = tuple(row.text("class").split())
    return Item(row.integer("item_id"), title, genres, year or title_year(name))


def _ml100k_item(row: RawRow, genres: tuple[str, ...]) -> Item:
    """u.item: the title carries the year; genres are 0/1 flags named by u.genre."""
    title = _item_title(row, "title")
    release = row.text("release_date")
    year = title_year(title) or (int(release[-4:]) if release[-4:].isdigit() else None)
    flagged = tuple(genre for genre in genres if row.integer(genre) == 1)
    return Item(row.integer("item_id"), title, flagged, year)


def _ml1m_item(row: RawRow) -> Item:
    title = _item_title(row, "title")
    genres = tuple(genre for genre in row.text("genres").split("|") if genre)
    return Item(row.integer("item_id"), title, genres, title_year(title))


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """A source layout: its three tables and how their rows become items, users, interactions."""

    name: str
    dataset: str
    interactions: Table
    items: Table
    users: Table
    item: Callable[[RawRow], Item]
    user: Callable[[RawRow], User]
    extra_files: tuple[str, ...] = ()  # also read, so also fingerprinted in meta.json

    @property
    def files(self) -> tuple[str, ...]:
        return (self.interactions.file, self.items.file, self.users.file, *self.extra_files)


def _recbole_layout(root: Path) -> Layout:
    inters = sorted(path.stem for path in root.glob("*.inter"))
    if len(inters) != 1:
        raise InputError(f"expected one RecBole *.inter file, found {len(inters)}", file=root)
    stem = inters[0]
    return Layout(
        name="recbole-atomic",
        dataset=f"movielens-{stem.removeprefix('ml-')}" if stem.startswith("ml-") else stem,
        interactions=Table(f"{stem}.inter", "\t", None, required=INTERACTION_COLUMNS),
        items=Table(
            f"{stem}.item", "\t", None, required=("item_id", "movie_title", "release_year", "class")
        ),
        users=Table(
            f"{stem}.user", "\t", None, required=("user_id", "age", "gender", "occupation")
        ),
        item=_recbole_item,
        user=_user,
    )


def _ml100k_layout(root: Path) -> Layout:
    genres, extra_files = ML100K_GENRES, ()
    if (root / "u.genre").is_file():
        rows = read_table(root, Table("u.genre", "|", ("genre", "index"), "latin-1"))
        genres = tuple(row.text("genre") for row in sorted(rows, key=lambda r: r.integer("index")))
        extra_files = ("u.genre",)
    item_columns = ("item_id", "title", "release_date", "video_release_date", "url", *genres)
    return Layout(
        name="grouplens-ml-100k",
        dataset="movielens-100k",
        interactions=Table("u.data", "\t", INTERACTION_COLUMNS),
        items=Table("u.item", "|", item_columns, "latin-1"),
        users=Table("u.user", "|", ("user_id", "age", "gender", "occupation", "zip_code")),
        item=lambda row: _ml100k_item(row, genres),
        user=_user,
        extra_files=extra_files,
    )


def _ml1m_layout(root: Path) -> Layout:
    return Layout(
        name="grouplens-ml-1m",
        dataset="movielens-1m",
        interactions=Table("ratings.dat", "::", INTERACTION_COLUMNS),
        items=Table("movies.dat", "::", ("item_id", "title", "genres"), "latin-1"),
        users=Table("users.dat", "::", ("user_id", "gender", "age", "occupation", "zip_code")),
        item=_ml1m_item,
        user=_ml1m_user,
    )


def detect_layout(root: Path) -> Layout:
    """Tell the layout by the files present, so --source accepts any of them unchanged."""
    if not root.is_dir():
        raise InputError("source directory not found", file=root)
    if (root / "u.data").exists() or (root / "u.item").exists():
        return _ml100k_layout(root)
    if (root / "ratings.dat").exists() or (root / "movies.dat").exists():
        return _ml1m_layout(root)
    if any(root.glob("*.inter")):
        return _recbole_layout(root)
    raise InputError(
        "no MovieLens files found (expected u.data/u.item/u.user, "
        "ratings.dat/movies.dat/users.dat, or RecBole *.inter/*.item/*.user)",
        file=root,
    )


def read_source(root: str | Path) -> Source:
    """Read and cross-check a source directory in any supported layout."""
    root = Path(root)
    layout = detect_layout(root)
    items = _unique(read_table(root, layout.items), layout.item, "item_id")
    users = _unique(read_table(root, layout.users), layout.user, "user_id")
    interactions = []
    for row in read_table(root, layout.interactions):
        interaction = _interaction(row)
        if interaction.user_id not in users:
            raise row.error(f"unknown user {interaction.user_id}", "user_id")
        if interaction.item_id not in items:
            raise row.error(f"item {interaction.item_id} has no row in the item file", "item_id")
        interactions.append(interaction)
    files = {name: file_sha256(root / name) for name in layout.files}
    return Source(layout.name, layout.dataset, files, items, users, interactions)


def _unique(rows: Iterator[RawRow], parse: Callable[[RawRow], Item | User], key: str) -> dict:
    parsed: dict = {}
    for row in rows:
        record = parse(row)
        record_id = getattr(record, key)
        if record_id in parsed:
            raise row.error(f"duplicate {key} {record_id}", key)
        parsed[record_id] = record
    return parsed
