"""Entry point of the `fudlr` command: every failure the user can fix ends as one line, exit 2.

The method's commands come from `fudlr.cli`, the service's from `clients.commands`. Each
imports torch, Celery or SQLAlchemy only when it runs, so a client install
(`pip install 'fudlr[client]'`) lists every command and says what to install for the rest.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

# typer bundles its own click; its exceptions are not re-exported at the top level
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from clients.commands import add_to
from fudlr.cli import app
from fudlr.errors import FudlrError

add_to(app)  # the service's commands next to the method's
OWN_PACKAGES = ("fudlr", "service", "workers", "clients", "bench")


def main(argv: list[str] | None = None) -> None:
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        code = app(args=argv, prog_name="fudlr", standalone_mode=False)
    except NoArgsIsHelpError as error:
        error.show()
        sys.exit(2)
    except UsageError as error:
        # a bad flag or value: one line naming it, instead of a usage box
        command = f"{error.ctx.command_path}: " if error.ctx else ""
        stderr.print(f"[bold red]error:[/] {escape(command + error.format_message())}")
        sys.exit(2)
    except ClickException as error:
        stderr.print(f"[bold red]error:[/] {escape(error.format_message())}")
        sys.exit(error.exit_code)
    except typer.Abort:
        stderr.print("[bold red]error:[/] aborted")
        sys.exit(1)
    except FudlrError as error:
        stderr.print(f"[bold red]error:[/] {escape(str(error))}")
        sys.exit(2)
    except ModuleNotFoundError as error:
        # a client install (`fudlr[client]`) lists every command but runs only the client's
        if error.name is None or error.name.partition(".")[0] in OWN_PACKAGES:
            raise
        install = "pip install 'fudlr[all]'"
        needs = f"this command needs '{error.name}', which this install lacks: {install}"
        stderr.print(f"[bold red]error:[/] {escape(needs)}")
        sys.exit(2)
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        stderr.print(f"[bold red]error:[/] {escape(str(error.strerror or error))}{escape(where)}")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
