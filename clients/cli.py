"""Entry point of the `fudlr` command: every failure the user can fix ends as one line, exit 2.

The method's commands come from `fudlr.cli`, the service's from `clients.commands`.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from clients.commands import add_to
from fudlr.cli import app
from fudlr.errors import FudlrError

add_to(app)  # the service's commands next to the method's


def main(argv: list[str] | None = None) -> None:
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app(args=argv, prog_name="fudlr")
    except FudlrError as error:
        stderr.print(f"[bold red]error:[/] {escape(str(error))}")
        sys.exit(2)
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        stderr.print(f"[bold red]error:[/] {escape(str(error.strerror or error))}{escape(where)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
