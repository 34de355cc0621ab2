"""`histocsc config`: the packaged configuration presets, listed or written out."""

from __future__ import annotations

from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors

config_app = typer.Typer(help="The packaged configuration presets (list, show).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("list")
@user_errors
def list_command() -> None:
    """Print the names of the packaged presets (each usable as `--config NAME`)."""
    from histocsc.config import packaged_config, presets

    for name in presets():
        first = packaged_config(f"{name}.yaml").read_text().splitlines()[:1]
        typer.echo(f"{name:10s} {first[0].lstrip('# ') if first else ''}")


@config_app.command("show")
@user_errors
def show_command(
    name: Annotated[str, typer.Argument(help="A preset name, e.g. train-ci (see `config list`).")],
) -> None:
    """Write a preset's YAML to stdout: `histocsc config show train > my.yaml` to start your own."""
    from histocsc.config import packaged_config, presets
    from histocsc.errors import ConfigNotFoundError

    stem = name.removesuffix(".yaml")
    if stem not in presets():
        raise ConfigNotFoundError(f"{name}: no such preset (presets: {', '.join(presets())})")
    typer.echo(packaged_config(f"{stem}.yaml").read_text(), nl=False)
