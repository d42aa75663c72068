"""Paired bootstrap over users: how sure a difference between two systems is.

Two recommenders measured on the same users differ by a per-user amount (an NDCG, a
hit); resampling the users (the same resample for both) gives an interval for the
mean difference and how often it is not positive. Counts of hits are small on a few
hundred users, so a rate without this interval says little.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

Row = TypeVar("Row")


@dataclass(frozen=True)
class PairedDifference:
    """mean of (b - a) over users, its percentile interval at `confidence`, and the fraction
    of resamples in which it is not above zero (a one-sided bootstrap p for b > a)."""

    mean: float
    low: float
    high: float
    confidence: float
    p_not_above: float
    users: int
    resamples: int

    def describe(self) -> dict[str, float | int]:
        return asdict(self)


def resampled_users(rows: Sequence[Row], seed: int, resamples: int) -> Iterator[list[Row]]:
    """Bootstrap resamples of the users (with replacement, as many as there are), the same
    sequence for a given seed: every metric judged on the same seed sees the same resamples,
    before and after alike, so their noise is compared like for like."""
    rng = random.Random(seed)
    for _ in range(resamples):
        yield rng.choices(rows, k=len(rows))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The bootstrap of mean(b - a) over paired per-user values."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError("paired values need the same, non-zero number of users")
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[draws].mean(axis=1)
    return _summarised(float(differences.mean()), means, confidence, len(differences))


def paired_changes(
    rows: Sequence[Row],
    before: Callable[[Sequence[Row]], Mapping[str, float]],
    after: Callable[[Sequence[Row]], Mapping[str, float]],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """The bootstrap of after(users) - before(users) for metrics of a whole set of users
    (group shares, unfairness), which are not means of per-user values: each resample of
    the users is measured under both systems. `before` and `after` return every metric by
    name, so one measurement per resample serves them all."""
    import numpy as np

    if not rows:
        raise ValueError("a paired change needs users")
    was, now = before(rows), after(rows)
    changes: dict[str, list[float]] = {name: [] for name in now}
    for sample in resampled_users(rows, seed, resamples):
        sample_before, sample_after = before(sample), after(sample)
        for name, values in changes.items():
            values.append(sample_after[name] - sample_before[name])
    return {
        name: _summarised(now[name] - was[name], np.asarray(values), confidence, len(rows))
        for name, values in changes.items()
    }


def paired_change(
    rows: Sequence[Row],
    before: Callable[[Sequence[Row]], float],
    after: Callable[[Sequence[Row]], float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """`paired_changes` of one metric (a number of a whole set of users)."""
    return paired_changes(
        rows,
        lambda sample: {"": before(sample)},
        lambda sample: {"": after(sample)},
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )[""]


def _summarised(mean: float, resampled, confidence: float, users: int) -> PairedDifference:
    """A difference from its value on the users and its values on the resamples (an array)."""
    import numpy as np

    tail = (1 - confidence) / 2
    return PairedDifference(
        mean=mean,
        low=float(np.quantile(resampled, tail)),
        high=float(np.quantile(resampled, 1 - tail)),
        confidence=confidence,
        p_not_above=float((resampled <= 0).mean()),
        users=users,
        resamples=len(resampled),
    )
