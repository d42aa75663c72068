"""The method's commands (data, models, train, recommend, metrics, index, debias), by concern."""

from __future__ import annotations

import typer

from fudlr import __version__
from fudlr.data.cli import app as data_app
from fudlr.fairness.cli import metrics
from fudlr.influence.cli import index
from fudlr.models.cli import app as models_app
from fudlr.recommender.cli import recommend, train
from fudlr.repair.cli import debias

app = typer.Typer(
    help="FUDLR: repair the fairness of a LoRA LLM recommender without retraining it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.command("train")(train)
app.command("recommend")(recommend)
app.command("metrics")(metrics)
app.command("index")(index)
app.command("debias")(debias)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fudlr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """FUDLR: repair the fairness of a LoRA LLM recommender without retraining it."""
