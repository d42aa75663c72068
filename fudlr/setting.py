"""A configuration field's help and allowed values, declared once beside its default.

A job's settings reach it through the API, `fudlr debias` and `fudlr submit`; each of
those shows the help and refuses what the config would refuse, all read from the field's
`metadata=setting(...)` (the way PEFT's LoraConfig carries `metadata={"help": ...}`).
Plain bounds and choices live here; a check that relates values stays code in the
config's `__post_init__`. The standard library only (`option` imports typer when called):
the API process and the client install import it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from fudlr.errors import InputError

_KEY = "setting"


@dataclass(frozen=True)
class Setting:
    """help: what the setting does, for people; ge/gt/le/lt: numeric bounds (None: none);
    choices: the values a string setting takes (empty: any)."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def bounds(self) -> dict[str, float]:
        """The bounds that are set, by name (pydantic's `Field` takes the same names)."""
        named = {"ge": self.ge, "gt": self.gt, "le": self.le, "lt": self.lt}
        return {name: bound for name, bound in named.items() if bound is not None}

    @property
    def allowed(self) -> str:
        """The allowed values in words ("in (0, 1]", "at least 1", "one of a, b"), or ""."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        low = high = None
        if self.ge is not None:
            low = (self.ge, "[", "at least")
        elif self.gt is not None:
            low = (self.gt, "(", "greater than")
        if self.le is not None:
            high = (self.le, "]", "at most")
        elif self.lt is not None:
            high = (self.lt, ")", "less than")
        if low and high:
            return f"in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
        if low or high:
            bound, _, words = low or high
            return f"{words} {bound:g}"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None (None itself is left to the field's type)."""
        if value is None:
            return None
        if self.choices:
            fits = value in self.choices
        else:
            fits = (
                (self.ge is None or value >= self.ge)
                and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
                and (self.lt is None or value < self.lt)
            )
        return None if fits else f"must be {self.allowed}, not {value!r}"


def setting(
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] = (),
) -> dict[str, Setting]:
    """A dataclass field's `metadata` that makes it a setting."""
    return {_KEY: Setting(help, ge, gt, le, lt, choices)}


@dataclass(frozen=True)
class Declared:
    """A setting as its config declares it: `owner` is the dataclass that holds the field."""

    name: str
    default: Any
    setting: Setting
    owner: type


def declared(*configs: type) -> dict[str, Declared]:
    """The settings of the config dataclasses, by name; a name may appear once across them,
    so the settings form one flat namespace (the API's and the CLI's)."""
    found: dict[str, Declared] = {}
    for config in configs:
        for item in fields(config):
            if _KEY not in item.metadata:
                continue
            if item.name in found:
                raise TypeError(f"setting {item.name} is declared twice")
            default = item.default if item.default_factory is MISSING else item.default_factory()
            found[item.name] = Declared(item.name, default, item.metadata[_KEY], config)
    return found


def option(entry: Declared, *flags: str, server_default: bool = False) -> Any:
    """The setting's `typer.Option`: its default, its help with the allowed values, and a
    check that refuses any other value as one line. server_default: None unless given, so
    that a client leaves the value to the server (the help still shows the default)."""
    import typer  # only where a command line is built; the API process never is

    allowed = entry.setting.allowed
    help_text = f"{entry.setting.help}; must be {allowed}." if allowed else f"{entry.setting.help}."

    def refuse(value: Any) -> Any:
        problem = entry.setting.problem(value)
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    if server_default:
        shown = str(entry.default) if entry.default is not None else False
        return typer.Option(None, *flags, help=help_text, callback=refuse, show_default=shown)
    return typer.Option(entry.default, *flags, help=help_text, callback=refuse)


def check(config: Any) -> None:
    """Refuse a config (InputError naming the field) whose setting is out of its bounds or
    choices; for a config's `__post_init__`."""
    for item in fields(config):
        if _KEY in item.metadata:
            problem = item.metadata[_KEY].problem(getattr(config, item.name))
            if problem is not None:
                raise InputError(f"{item.name} {problem}", field=item.name)
