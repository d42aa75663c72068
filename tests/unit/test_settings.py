"""A job's settings are declared once, on the method's configs (fudlr/repair/config.py): the
API's fields, `fudlr debias`'s and `fudlr submit`'s options and the configs' own checks all
read their default, bounds and help from there, so a new setting shows up everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from typer.core import TyperGroup, TyperOption
from typer.main import get_command

from clients.cli import app
from fudlr.errors import InputError
from fudlr.repair.config import SETTINGS, DebiasConfig, job_config
from fudlr.repair.spec import BiasSpec
from service.jobs.schemas import Budget, JobSpec, Options
from tests.conftest import out_of_bounds, run_cli

BIAS = {"side": "item", "attribute": "popularity_group", "metric": "MGU", "k": 5}
SPEC = BiasSpec("item", "popularity_group", "MGU", 5)
API = {name: "budget" for name in Budget.model_fields} | {
    name: "options" for name in Options.model_fields
}
BOUNDED = sorted(name for name, declared in SETTINGS.items() if out_of_bounds(declared.setting))


def _setting_options(command: str) -> dict[str, TyperOption]:
    """The command's options named after a setting, as the command line parses them."""
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    return {
        param.name: param
        for param in group.commands[command].params
        if isinstance(param, TyperOption) and param.name in SETTINGS
    }


def _schema_of(group: str, name: str) -> dict[str, Any]:
    """The field's JSON schema, its constraints merged from an optional field's anyOf."""
    schema = JobSpec.model_json_schema()["$defs"][group.title()]["properties"][name]
    merged = dict(schema)
    for variant in schema.get("anyOf", []):
        merged |= variant
    return merged


def test_every_api_field_and_setting_flag_is_a_declared_setting() -> None:
    assert set(API) <= set(SETTINGS)
    assert set(_setting_options("submit")) <= set(Budget.model_fields) | {"drop_unmeasurable"}


@pytest.mark.parametrize("name", sorted(API))
def test_the_api_schema_shows_the_declared_default_bounds_and_help(name: str) -> None:
    declared, schema = SETTINGS[name], _schema_of(API[name], name)
    assert schema["description"].startswith(declared.setting.help)
    if name != "decoding":  # left out: the recommender's own (the API's note says so)
        assert schema["default"] == to_jsonable_python(declared.default)
    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for kind, bound in declared.setting.bounds.items():
        assert schema[keys[kind]] == bound
    if declared.setting.choices:
        assert tuple(schema["enum"]) == declared.setting.choices


@pytest.mark.parametrize("command", ["debias", "submit"])
def test_the_command_lines_show_the_declared_default_bounds_and_help(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: the help is read whole
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    shown = " ".join(out.replace("│", " ").split())
    for name, param in _setting_options(command).items():
        setting = SETTINGS[name].setting
        text = f"{setting.help}; must be {setting.allowed}." if setting.allowed else setting.help
        assert param.help is not None and param.help.startswith(text), name
        assert text in shown, name
        default = SETTINGS[name].default
        if command == "debias" or isinstance(default, bool):
            assert param.default == default, name
        else:  # left to the server, which applies the same default
            assert param.default is None
            assert param.show_default == (str(default) if default is not None else False)


def test_the_api_and_the_command_line_defaults_are_the_methods() -> None:
    method = DebiasConfig(biases=(SPEC,))
    assert JobSpec.model_validate({"biases": [BIAS]}).to_config() == method
    flags = {name: param.default for name, param in _setting_options("debias").items()}
    assert job_config([SPEC], flags) == method


@pytest.mark.parametrize("name", BOUNDED)
def test_the_config_refuses_a_value_out_of_bounds_naming_the_setting(name: str) -> None:
    for value in out_of_bounds(SETTINGS[name].setting):
        with pytest.raises(InputError) as refused:
            job_config([SPEC], {name: value})
        assert refused.value.field == name
        assert SETTINGS[name].setting.allowed in refused.value.reason


@pytest.mark.parametrize("name", sorted(set(API) & set(BOUNDED)))
def test_the_api_schema_refuses_a_value_out_of_bounds_at_its_field(name: str) -> None:
    for value in out_of_bounds(SETTINGS[name].setting):
        with pytest.raises(ValidationError) as refused:
            JobSpec.model_validate({"biases": [BIAS], API[name]: {name: value}})
        assert refused.value.errors()[0]["loc"][:2] == (API[name], name)


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (command, name)
        for command in ("debias", "submit")
        for name in BOUNDED
        if name in _setting_options(command)
    ],
)
def test_the_command_lines_refuse_a_value_out_of_bounds_as_one_line(
    command: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused while parsing: no bundle read, no torch, no request sent."""
    flag = "--" + name.replace("_", "-")
    if command == "debias":
        paths = [f"--{item}={tmp_path / item}" for item in ("base-model", "adapter", "out")]
        args = ["debias", *paths, f"--bundle={tmp_path / 'bundle'}"]
    else:
        args = ["submit", "rec_none"]
    for value in out_of_bounds(SETTINGS[name].setting):
        code, _, err = run_cli(
            [*args, "--bias=item:popularity_group:MGU@5", flag, str(value)], capsys
        )
        assert code == 2
        (line,) = err.strip().splitlines()
        allowed = SETTINGS[name].setting.allowed
        assert line.startswith(f"error: fudlr {command}: Invalid value for '{flag}': must be ")
        assert f"must be {allowed}, not " in line
