"""`histocsc tiles`: tissue, tile grid and tile pixels of slides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, note, user_errors
from histocsc.cli.options import (
    ForceOpt,
    OverrideSlideMppOpt,
    RecursiveOpt,
    SlideMppOpt,
    SlidesArg,
)

TilesConfigOpt = Annotated[
    Path | None, typer.Option(help="YAML config (default: built-in, see configs/tiles.yaml).")
]


@app.command()
@user_errors
def tiles(
    slides: SlidesArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder a slide).")],
    mpp: Annotated[float | None, typer.Option(help="Tile resolution, µm/px [0.5].")] = None,
    tile_px: Annotated[int | None, typer.Option(help="Tile side in pixels [224].")] = None,
    save_images: Annotated[
        bool, typer.Option("--save-images", help="Also store tile pixels in tiles.npy.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Parallel processes.")] = 1,
    config: TilesConfigOpt = None,
    slide_mpp: SlideMppOpt = None,
    override_slide_mpp: OverrideSlideMppOpt = None,
    force: ForceOpt = False,
    recursive: RecursiveOpt = False,
) -> None:
    """Find tissue, lay a tile grid over it, write mask/thumbnail/grid (and tile pixels)."""
    from histocsc.config import load_config
    from histocsc.errors import SlideError
    from histocsc.progress import progress_bar
    from histocsc.wsi.discover import find_slides
    from histocsc.wsi.extract import plan_tasks, tile_slides
    from histocsc.wsi.grid import TilesConfig

    cfg = load_config(TilesConfig, config, {"mpp": mpp, "tile_px": tile_px})
    found = find_slides(slides, recursive, notify=note)
    tasks = plan_tasks(found, out, slide_mpp, override_slide_mpp)
    results = tile_slides(tasks, cfg, save_images, workers, force, progress=progress_bar)
    failed = [r for r in results if r.error]
    for r in results:
        for message in r.warnings:
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        if not r.error:
            state = "skipped (already done)" if r.skipped else f"{r.n_tiles} tiles"
            typer.echo(f"{r.path.name}: {state} -> {r.out_dir}")
    if failed:
        if len(failed) == 1 and len(results) == 1:
            raise SlideError(failed[0].error or "")
        for r in failed:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
        raise SlideError(f"{len(failed)} of {len(results)} slides failed (see above)")
