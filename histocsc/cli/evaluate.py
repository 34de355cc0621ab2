"""`histocsc evaluate`: heatmaps of one slide against truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors


@app.command("evaluate")
@user_errors
def evaluate_command(
    pred_dir: Annotated[Path, typer.Argument(help="One slide's folder of `histocsc infer`.")],
    truth: Annotated[Path, typer.Option("--truth", help="Phantom case folder, QuPath GeoJSON, "
                                        "or a prepared case folder (IHC labels).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (default PRED_DIR/evaluation).")
    ] = None,
) -> None:
    """Compare heatmaps with truth: AUROC, AP, Dice, IoU, ECE per marker, and pictures."""
    from histocsc.evaluate.metrics import evaluate
    from histocsc.progress import working

    out = out if out is not None else pred_dir / "evaluation"
    with working(f"evaluate {pred_dir.name}"):
        result = evaluate(pred_dir, truth, out)
    for marker, row in result["markers"].items():
        tile, pixel = row["tile"], row["pixel"]
        auroc = "n/a" if tile["auroc"] is None else f"{tile['auroc']:.3f}"
        ece = "n/a" if tile["ece"] is None else f"{tile['ece']:.3f}"
        typer.echo(f"{marker}: cell Dice {tile['dice']:.3f} IoU {tile['iou']:.3f} AUROC {auroc} "
                   f"ECE {ece}; pixel Dice {pixel['dice']:.3f} IoU {pixel['iou']:.3f} "
                   f"(threshold {row['threshold']:.2f}, {tile['cells']} cells)")
    typer.echo(f"wrote {out / 'evaluation.json'} ({result['truth']['kind']} truth)")
