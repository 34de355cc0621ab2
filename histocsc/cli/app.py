"""The Typer app every command module registers on: error handling, --debug, --version."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from histocsc import __version__
from histocsc.errors import HistocscError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

app = typer.Typer(
    name="histocsc",
    help="Find stem-like (CD133 / CD44 positive) tumour regions on H&E whole-slide images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Print a HistocscError as one line and exit 1; full traceback only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HistocscError as exc:
            if _state["debug"]:
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def note(message: str) -> None:
    """A notice for the user (stderr, yellow): something was left out or is not what it seems."""
    typer.secho(f"note: {message}", fg=typer.colors.YELLOW, err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"histocsc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """histocsc: tiles, IHC labels, training, ONNX export and heatmaps for CSC markers."""
    _state["debug"] = debug


PathArg = Annotated[Path, typer.Argument(help="A path.")]


def run() -> None:
    """Entry point used by `python -m histocsc`."""
    app(prog_name="histocsc")
