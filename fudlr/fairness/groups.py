"""Group membership of items and users by one of their attributes (docs/method.md, "Metrics").

An attribute value may be a scalar (popularity_group: 2) or a list (genres: ["Action",
"Drama"]); a list puts the entity in every listed group, so a two-genre item counts once
in each genre. Group names are strings so that they can be JSON keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fudlr.data.schema import ItemRow, UserRow
from fudlr.errors import InputError

_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class Groups:
    """Which groups each entity of one kind (item or user) belongs to, for one attribute.

    names: every value present among the entities, sorted (numerically when all are numbers).
    members: entity id -> its group names; empty for an entity lacking the attribute.
    """

    kind: str
    attribute: str
    names: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]

    def of(self, entity_id: str) -> tuple[str, ...]:
        """The groups of one entity; an unknown id is an error, never an empty membership."""
        try:
            return self.members[entity_id]
        except KeyError:
            raise InputError(f"unknown {self.kind} '{entity_id}'") from None


def item_groups(items: Mapping[str, ItemRow], attribute: str) -> Groups:
    """Items grouped by a catalog attribute such as popularity_group or genres."""
    return group_by({item_id: row.attributes for item_id, row in items.items()}, attribute, "item")


def user_groups(users: Mapping[str, UserRow], attribute: str) -> Groups:
    """Users grouped by a profile attribute such as gender."""
    return group_by({user_id: row.attributes for user_id, row in users.items()}, attribute, "user")


def group_by(attributes: Mapping[str, Mapping[str, Any]], attribute: str, kind: str) -> Groups:
    """Group entities (id -> attributes dict) by one attribute; null counts as absent."""
    values: dict[str, list[Any]] = {
        entity_id: _values(entity_id, attrs.get(attribute), attribute, kind)
        for entity_id, attrs in attributes.items()
    }
    present = [value for entity_values in values.values() for value in entity_values]
    if not present:
        available = sorted({name for attrs in attributes.values() for name in attrs})
        raise InputError(
            f"no {kind} has the attribute '{attribute}' "
            f"(available: {', '.join(available) or 'none'})"
        )
    members = {
        entity_id: tuple(dict.fromkeys(str(value) for value in entity_values))
        for entity_id, entity_values in values.items()
    }
    return Groups(kind=kind, attribute=attribute, names=_sorted_names(present), members=members)


def _values(entity_id: str, raw: Any, attribute: str, kind: str) -> list[Any]:
    """The attribute's values as a list, refusing nested structures that cannot name a group."""
    listed = raw if isinstance(raw, list) else [] if raw is None else [raw]
    for value in listed:
        if not isinstance(value, _SCALARS):
            raise InputError(
                f"{kind} '{entity_id}': attribute '{attribute}' holds {value!r}, "
                "expected a string, a number or a list of them"
            )
    return listed


def _sorted_names(values: list[Any]) -> tuple[str, ...]:
    """Distinct group names, in numeric order when every value is a number (0, 1, ..., 10)."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    ordered = sorted(set(values)) if numeric else sorted({str(v) for v in values})
    return tuple(dict.fromkeys(str(value) for value in ordered))
