"""The `revdeq` entrypoint.

Each command lives in its own module and registers itself on `app`; heavy libraries (torch,
transformers, datasets) are imported inside the command functions so `revdeq --help` and shell
completion stay fast. Exit codes (Typer handles usage errors and Ctrl-C, `_RevdeqGroup` a `UserError`):

    0    success
    2    bad input: a `UserError` (one readable line on stderr, no traceback)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from revdeq_cli.errors import UserError
from revdeq_cli.version import __version__


class _RevdeqGroup(TyperGroup):
    """Turns a `UserError` from any command into its one line on stderr and exit 2. Done here, not in
    `main()`, so every way of invoking the app (the console script, `python -m`, `CliRunner`) agrees."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as err:
            typer.echo(f"revdeq: error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="revdeq",
    cls=_RevdeqGroup,
    help="Reversible Deep Equilibrium Models: train, generate, evaluate, inspect and convert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"revdeq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version_callback, is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Reversible Deep Equilibrium Models (RevDEQ): exact, constant-memory gradients."""


def _register_commands() -> None:
    # Importing a command module registers it on `app`; the modules import nothing heavy at import time.
    import importlib

    for name in ("train", "generate", "eval", "inspect", "convert"):
        try:
            importlib.import_module(f"revdeq_cli.cli.{name}_cmd")
        except ModuleNotFoundError as err:  # a command still being written must not break the others
            if err.name != f"revdeq_cli.cli.{name}_cmd":
                raise


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit 0 on success, 2 on bad input (usage errors and `UserError`), 130 on Ctrl-C."""
    app(args=argv)
