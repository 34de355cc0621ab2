"""The options every command shares, spelled and explained once (see the README's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SlideMppOpt = Annotated[
    float | None,
    typer.Option("--slide-mpp",
                 help="Pixel size of the slides (µm/px), used only when a file records none."),
]
OverrideSlideMppOpt = Annotated[
    float | None,
    typer.Option("--override-slide-mpp",
                 help="Replace the pixel size the files record (µm/px); warns when it differs."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo work that is already finished.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", hidden=True, help="Deprecated: use --force.")
]
RecursiveOpt = Annotated[
    bool, typer.Option("--recursive", "-r", help="Also search the sub-folders of named folders.")
]
ShardOpt = Annotated[
    str | None, typer.Option("--shard", help="I/N: process every N-th item from the I-th.")
]
SlidesArg = Annotated[
    list[Path], typer.Argument(help="Slide files and/or folders of slides (or of PNG/JPEG images).")
]


def force_or_overwrite(force: bool, overwrite: bool) -> bool:
    """--force, with the deprecated --overwrite accepted as an alias that says so."""
    if overwrite:
        typer.secho("warning: --overwrite is deprecated and will be removed; use --force",
                    fg=typer.colors.YELLOW, err=True)
    return force or overwrite


def check_working_mpp(mpp: float | None, model_mpp: float, model: Path) -> None:
    """`infer --mpp` names the working resolution, which the model fixes: it must agree."""
    from histocsc.errors import ConfigError

    if mpp is not None and abs(mpp - model_mpp) > 1e-6 * model_mpp:
        raise ConfigError(
            f"--mpp {mpp:g}: {model} works at {model_mpp:g} µm/px and infer always uses that; "
            "for the slide's own pixel size use --slide-mpp (only when the file records none) "
            "or --override-slide-mpp")
