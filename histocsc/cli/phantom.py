"""`histocsc phantom`: synthetic H&E + IHC slide pairs with known truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors


@app.command()
@user_errors
def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder (one sub-folder per case).")],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = 5,
    size_px: Annotated[int, typer.Option("--size-px", help="Slide width = height, px.")] = 8192,
    slide_mpp: Annotated[
        float, typer.Option("--slide-mpp", help="Pixel size the slides record, µm/px.")
    ] = 0.5,
    markers: Annotated[str, typer.Option("--markers", help="Comma-separated IHC markers.")] = (
        "CD133,CD44"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    fill_frame: Annotated[
        bool, typer.Option("--fill-frame", help="Tissue fills the whole frame (no outline).")
    ] = False,
) -> None:
    """Write synthetic H&E + IHC slide pairs with known truth, and a cohort.csv."""
    from histocsc.progress import progress_bar
    from histocsc.synthetic.generate import make_cohort, tiles_per_case

    names = [m.strip() for m in markers.split(",") if m.strip()]
    total = cases * tiles_per_case(size_px, len(names))
    with progress_bar("phantom", total) as advance:
        csv_path = make_cohort(out, cases, size_px, slide_mpp, names, seed, advance, fill_frame)
    typer.echo(f"wrote {cases} case(s) and {csv_path}")
