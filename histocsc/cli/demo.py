"""`histocsc demo`: the whole pipeline on phantom slides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = (
        Path("demo-output")
    ),
    cases: Annotated[int, typer.Option(min=3, help="Phantom cases (at least 3).")] = 5,
    size_px: Annotated[int, typer.Option(help="Phantom slide side in px (at 1 µm/px).")] = 2560,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the whole pipeline on built-in phantom slides and check the heatmaps against truth."""
    from histocsc.pipeline.demo import run_demo

    summary = run_demo(out, cases=cases, size_px=size_px, seed=seed, epochs=epochs,
                       say=typer.echo)
    typer.echo("")
    typer.echo(f"test-case AUROC per marker: {summary['test_auroc']}")
    typer.echo(f"test-case ECE per marker (before -> after calibration): "
               f"{summary['test_ece']}")
    typer.echo(f"heatmap Dice vs phantom truth (overlap {summary['overlap']:g}), tile level: "
               f"{summary['heatmap_dice_vs_truth']}; pixel level: "
               f"{summary['pixel_dice_vs_truth']}")
    typer.echo(f"timings (s): {summary['timings_s']}")
    for name in summary["outputs"]["heatmaps"]:
        typer.echo(f"look at: {name}/ (heatmap_*.png, tiles.geojson for QuPath)")
    typer.echo(f"summary: {out / 'demo_summary.json'}")
    for page in summary["outputs"]["reports"]:
        typer.echo(f"open the report in a browser: {page}")
