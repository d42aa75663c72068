"""What bias a debias job targets: `item:popularity_group:MGU@5`, `user:gender:NDCG@5`.

Specifications are checked against the bundle before any model is loaded, so a typo
costs a second, not an index pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.fairness.groups import Groups, item_groups, user_groups

ITEM_METRICS = ("MGU", "DGU")
USER_METRICS = ("NDCG",)
_PATTERN = re.compile(
    r"^(?P<side>item|user):(?P<attribute>[^:@*]+):(?P<metric>[A-Za-z]+)@(?P<k>\d+)"
    r"(?:\*(?P<weight>[0-9.]+))?$"
)


@dataclass(frozen=True)
class BiasSpec:
    """One fairness target.

    side: "item" (groups of items: their share of recommendations vs of histories) or
    "user" (groups of users: the gap in their utility). metric: MGU or DGU at K for
    items; NDCG at K (the gap between user groups' mean NDCG) for users. weight: relative
    weight when a job targets several biases at once.
    """

    side: str
    attribute: str
    metric: str
    k: int
    weight: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.side}:{self.attribute}:{self.metric}@{self.k}"

    @classmethod
    def parse(cls, text: str) -> BiasSpec:
        match = _PATTERN.match(text.strip())
        if match is None:
            raise InputError(
                f"bad bias '{text}': expected SIDE:ATTRIBUTE:METRIC@K[*WEIGHT], "
                "e.g. item:popularity_group:MGU@5 or user:gender:NDCG@5"
            )
        weight = float(match["weight"]) if match["weight"] else 1.0
        spec = cls(
            match["side"], match["attribute"], match["metric"].upper(), int(match["k"]), weight
        )
        spec.check_form()
        return spec

    def check_form(self) -> None:
        if self.side not in ("item", "user"):
            raise InputError(f"bias side '{self.side}' must be item or user")
        allowed = ITEM_METRICS if self.side == "item" else USER_METRICS
        if self.metric not in allowed:
            raise InputError(
                f"bias {self.label}: metric must be one of {', '.join(allowed)} for {self.side}s"
            )
        if self.k < 1:
            raise InputError(f"bias {self.label}: K must be at least 1")
        if not self.weight > 0:
            raise InputError(f"bias {self.label}: weight must be positive")

    def groups(self, bundle: Bundle, split: str = "valid") -> Groups:
        """The groups this bias compares, refusing specs the bundle cannot support."""
        self.check_form()
        if self.k > len(bundle.items):
            raise InputError(
                f"bias {self.label}: K={self.k} is larger than the catalog ({len(bundle.items)})"
            )
        if self.side == "item":
            groups = item_groups(bundle.items, self.attribute)
            if len(groups.names) < 2:
                raise InputError(f"bias {self.label}: '{self.attribute}' has a single group")
            return groups
        groups = user_groups(bundle.users, self.attribute)
        present = {name for row in bundle.split(split) for name in groups.of(row.user_id)}
        empty = [name for name in groups.names if name not in present]
        if empty:
            raise InputError(
                f"bias {self.label}: user group(s) {', '.join(empty)} have no user in the "
                f"{split} split"
            )
        if len(groups.names) < 2:
            raise InputError(f"bias {self.label}: '{self.attribute}' has a single group")
        return groups
