"""The ``mergekit-backdoor`` command: thin Typer commands over the library.

Each submodule adds the commands of one stage (merge, data, eval, audit) to ``app``.
Library errors (``BackdoorError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mergekit_backdoor import __version__
from mergekit_backdoor.cli.help import TidyGroup
from mergekit_backdoor.errors import BackdoorError

app = typer.Typer(
    name="mergekit-backdoor",
    help="Sanitize backdoored models by merging them with benign donors (mergekit), "
    "and measure clean accuracy and attack success rate (lm-evaluation-harness).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=TidyGroup,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mergekit-backdoor {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass

from mergekit_backdoor.cli import merge, repair, data, tasks, eval, scan, audit  # noqa: E402,F401,I001  (registers commands, in journey order)


def main() -> None:
    try:
        app()
    except BackdoorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
