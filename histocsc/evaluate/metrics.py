"""`histocsc evaluate`: an inference output folder against truth, per marker.

Three levels, each thresholded at the model's threshold for the marker (score_grid.json):

- cell ("tile level" of the heatmap): every scored cell of the score grid (a square of step_px;
  the tile itself without overlap) is truth-positive when >= 50 % of its known area is positive;
  AUROC and AP of the cell scores, Dice and IoU at the threshold, ECE, reliability diagram;
- model tiles: the same per row of scores.csv (one per tile the model saw);
- pixel: the thresholded heatmap drawn on the truth raster against the truth, over the whole
  slide (unscored area counts as predicted negative), unknown truth pixels left out.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.errors import DataError
from histocsc.evaluate.truth import TruthRaster
from histocsc.io import read_json

RELIABILITY_BINS = 10


def read_prediction(pred_dir: Path) -> dict[str, Any]:
    """Score grid, its geometry and the per-tile scores of one slide's inference outputs."""
    names = ("score_grid.npy", "score_grid.json", "scores.csv")
    missing = [n for n in names if not (pred_dir / n).is_file()]
    if missing:
        raise DataError(f"{pred_dir}: not a `histocsc infer` slide folder (lacks "
                        f"{', '.join(missing)})")
    geom = read_json(pred_dir / "score_grid.json")
    grid = np.load(pred_dir / "score_grid.npy")
    with (pred_dir / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    markers = list(geom["markers"])
    tiles = {k: np.array([float(r[k]) for r in rows]) for k in ("x", "y", "w", "h", *markers)}
    return {"grid": grid, "geom": geom, "tiles": tiles, "markers": markers}


def box_fraction(truth: np.ndarray, ds: float, boxes: np.ndarray) -> np.ndarray:
    """Mean truth over the known part of each level-0 box (NaN where none is known)."""
    from histocsc.synthetic.truth import box_integrals

    known = np.isfinite(truth)
    positive, _ = box_integrals(np.where(known, truth, 0.0), ds, boxes)
    area, _ = box_integrals(known.astype(np.float64), ds, boxes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 1e-6, positive / np.maximum(area, 1e-12), np.nan)


def overlap_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Dice, IoU and the counts behind them for two boolean arrays."""
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    denom = 2 * tp + fp + fn
    return {"dice": 2 * tp / denom if denom else 1.0, "iou": tp / (tp + fp + fn) if denom else 1.0,
            "tp": tp, "fp": fp, "fn": fn, "truth_positive": tp + fn, "predicted_positive": tp + fp}


def ranking_scores(scores: np.ndarray, positive: np.ndarray) -> dict[str, float | None]:
    """AUROC, average precision and ECE (torchmetrics); None where a class is missing."""
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    from histocsc.learn.calibration import ece

    p, t = torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(positive.astype(np.int64))
    both = 0 < int(t.sum()) < len(t)
    return {"auroc": float(binary_auroc(p, t)) if both else None,
            "ap": float(binary_average_precision(p, t)) if both else None,
            "ece": ece(p, t) if len(t) else None}


def reliability(scores: np.ndarray, positive: np.ndarray) -> list[dict[str, float | int]]:
    """Equal-width bins of predicted probability: count, mean prediction, observed frequency."""
    edges = np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, RELIABILITY_BINS - 1)
    out = []
    for b in range(RELIABILITY_BINS):
        sel = which == b
        n = int(sel.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                    "mean_predicted": float(scores[sel].mean()) if n else None,
                    "observed": float(positive[sel].mean()) if n else None})
    return out


def pixel_prediction(grid: np.ndarray, step: float, ds: float, shape: tuple[int, int]
                     ) -> np.ndarray:
    """The score grid (rows, cols) sampled at the centre of every truth-raster cell (NaN off it)."""
    ys = ((np.arange(shape[0]) + 0.5) * ds / step).astype(np.int64)
    xs = ((np.arange(shape[1]) + 0.5) * ds / step).astype(np.int64)
    out = np.full(shape, np.nan, np.float32)
    in_y, in_x = ys < grid.shape[0], xs < grid.shape[1]
    out[np.ix_(in_y, in_x)] = grid[np.ix_(ys[in_y], xs[in_x])]
    return out


def evaluate_marker(pred: dict[str, Any], truth: TruthRaster, marker: str) -> dict[str, Any]:
    """Every figure for one marker, plus the arrays the pictures need (key `_arrays`)."""
    geom, grid = pred["geom"], pred["grid"]
    j = pred["markers"].index(marker)
    threshold = float(geom["thresholds"][marker])
    step = float(geom["step_px"])
    raster = truth.rasters[marker]
    rows, cols = np.nonzero(np.isfinite(grid[..., j]))
    cells = np.stack([cols * step, rows * step, np.full(len(rows), step),
                      np.full(len(rows), step)], 1)
    frac = box_fraction(raster, truth.ds, cells)
    known = np.isfinite(frac)
    if not known.any():
        raise DataError(f"{truth.path}: the {marker} truth does not overlap the scored tissue of "
                        "the prediction")
    scores, positive = grid[rows, cols, j][known], frac[known] >= 0.5
    cell = {"cells": int(known.sum()), "cell_px": step,
            **ranking_scores(scores, positive), **overlap_scores(scores >= threshold, positive)}
    t = pred["tiles"]
    boxes = np.stack([t["x"], t["y"], t["w"], t["h"]], 1)
    tfrac = box_fraction(raster, truth.ds, boxes)
    tk = np.isfinite(tfrac)
    tile_scores, tile_pos = t[marker][tk], tfrac[tk] >= 0.5
    model_tiles = {"tiles": int(tk.sum()), **ranking_scores(tile_scores, tile_pos),
                   **overlap_scores(tile_scores >= threshold, tile_pos)}
    heat = pixel_prediction(grid[..., j], step, truth.ds, raster.shape)
    pix_known = np.isfinite(raster)
    pix_pred = np.nan_to_num(heat, nan=0.0) >= threshold
    pix_truth = np.nan_to_num(raster, nan=0.0) >= 0.5
    pixel = {"pixel_um": truth.ds * float(geom.get("slide_mpp") or math.nan),
             **overlap_scores(pix_pred[pix_known], pix_truth[pix_known])}
    return {"threshold": threshold, "tile": cell, "model_tiles": model_tiles, "pixel": pixel,
            "reliability": reliability(scores, positive),
            "_arrays": {"truth": raster, "heat": heat, "pred": pix_pred, "truth_pos": pix_truth,
                        "known": pix_known}}


def evaluate(pred_dir: Path, truth_path: Path, out: Path) -> dict[str, Any]:
    """Compare one slide's inference outputs with truth; write evaluation.json and pictures."""
    from histocsc.evaluate.plots import plot_comparison, plot_reliability
    from histocsc.evaluate.truth import read_truth
    from histocsc.io import write_json

    pred = read_prediction(pred_dir)
    geom = pred["geom"]
    truth = read_truth(truth_path, pred["markers"], int(geom["slide_width"]),
                       int(geom["slide_height"]), float(geom["step_px"]))
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "prediction": str(pred_dir.resolve()),
        "truth": {"kind": truth.kind, "path": str(truth.path.resolve()),
                  "raster_px": truth.ds},
        "definitions": {
            "tile": "score-grid cells, truth-positive when >= 50 % of the cell is positive",
            "model_tiles": "rows of scores.csv, truth-positive when >= 50 % positive",
            "pixel": "thresholded heatmap vs truth on the truth raster, whole slide",
            "ece": "L1, 15 equal-width bins (torchmetrics), over scored cells",
        },
        "markers": {},
    }
    for marker in truth.rasters:
        figures = evaluate_marker(pred, truth, marker)
        arrays = figures.pop("_arrays")
        files = [plot_reliability(out / f"reliability_{marker}.png", figures["reliability"],
                                  marker, figures["tile"]["ece"]),
                 plot_comparison(out / f"compare_{marker}.png", arrays, marker, figures)]
        figures["figures"] = [f.name for f in files]
        result["markers"][marker] = figures
    write_json(out / "evaluation.json", result)
    return result
