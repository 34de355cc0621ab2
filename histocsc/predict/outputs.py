"""Per-slide inference outputs: heatmaps, score grid, scores.csv, tiles.geojson, summary.json.

Every file is written under a temporary name and renamed; `summary.json` is written last, so its
presence marks a finished slide.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.io import atomic_path, write_json

SUMMARY = "summary.json"
SCORES_CSV = "scores.csv"
GEOJSON = "tiles.geojson"
SCORE_GRID = "score_grid.npy"
SCORE_GRID_JSON = "score_grid.json"
STEM_MAP = "heatmap_stem_like.png"
THUMB_MAX_PX = 2048
MARKER_COLORS = [(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0)]


@dataclass
class Tiles:
    """Tile geometry in level-0 px of one slide, plus its lattice (row/col of each tile)."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    tissue_fraction: np.ndarray
    slide_width: int
    slide_height: int
    slide_mpp: float
    mpp: float
    tile_px: int
    step: float  # lattice step in level-0 px (the grid stride)
    size: float  # tile side in level-0 px

    @property
    def rows(self) -> np.ndarray:
        return np.rint(self.y / self.step).astype(np.int64)

    @property
    def cols(self) -> np.ndarray:
        return np.rint(self.x / self.step).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the lattice covering the whole slide."""
        return (int(np.ceil(self.slide_height / self.step)),
                int(np.ceil(self.slide_width / self.step)))


def score_grid(tiles: Tiles, probs: np.ndarray) -> np.ndarray:
    """(rows, cols, markers) float32 lattice of probabilities; NaN where no tile was scored."""
    rows, cols = tiles.shape
    grid = np.full((rows, cols, probs.shape[1]), np.nan, np.float32)
    grid[tiles.rows, tiles.cols] = probs
    return grid


def write_outputs(
    out_dir: Path,
    tiles: Tiles,
    probs: np.ndarray,
    thumbnail: np.ndarray,
    thumb_mpp: float,
    model: dict[str, Any],
    slide_info: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Write every output of one slide into `out_dir` but summary.json, whose content it returns
    (the caller writes it last, as the mark of a finished slide)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markers: list[str] = list(model["markers"])
    thresholds = {m: float(model["thresholds"].get(m, 0.5)) for m in markers}
    from histocsc.predict.blend import blend_grid

    grid = blend_grid(tiles, probs)  # equals score_grid(tiles, probs) without overlap
    with atomic_path(out_dir / SCORE_GRID) as tmp, tmp.open("wb") as f:
        np.save(f, grid)
    write_json(out_dir / SCORE_GRID_JSON, grid_geometry(tiles, markers, thresholds))
    write_scores_csv(out_dir / SCORES_CSV, tiles, probs, markers)
    write_geojson(out_dir / GEOJSON, tiles, probs, markers, thresholds)
    files = [SCORE_GRID, SCORE_GRID_JSON, SCORES_CSV, GEOJSON]
    for i, marker in enumerate(markers):
        name = f"heatmap_{marker}.png"
        plot_heatmap(out_dir / name, thumbnail, thumb_mpp, tiles, grid[..., i], marker,
                     thresholds[marker], slide_info.get("name", ""))
        files.append(name)
    stem_like = stem_like_markers(model)
    if stem_like:
        pick = [markers.index(m) for m in stem_like]
        plot_stem_map(out_dir / STEM_MAP, thumbnail, thumb_mpp, tiles, grid[..., pick], stem_like,
                      thresholds, slide_info.get("name", ""))
        files.append(STEM_MAP)
    else:
        (out_dir / STEM_MAP).unlink(missing_ok=True)  # a rerun with another model
    tissue_grid = blend_grid(tiles, tiles.tissue_fraction[:, None].astype(np.float32))[..., 0]
    summary = summarise(tiles, probs, markers, thresholds, grid, tissue_grid, stem_like)
    return {"slide": slide_info, **summary, "model": model, "inference": inference_params(tiles),
            "timings_s": timings, "outputs": files}


def inference_params(tiles: Tiles) -> dict[str, Any]:
    """The grid parameters a rerun must match to reuse this slide's outputs."""
    from histocsc.predict.blend import WINDOW, tiles_per_cell

    return {"tile_px": tiles.tile_px, "stride_px": round(tiles.tile_px * tiles.step / tiles.size),
            "overlap": round(1.0 - tiles.step / tiles.size, 4), "blend_window": WINDOW,
            "tiles_per_cell": tiles_per_cell(tiles)}


def grid_geometry(
    tiles: Tiles, markers: list[str], thresholds: dict[str, float]
) -> dict[str, Any]:
    """The JSON sidecar of the score grid: how a cell maps to level-0 pixels."""
    rows, cols = tiles.shape
    return {
        "file": SCORE_GRID,
        "shape": [rows, cols, len(markers)],
        "axes": ["row", "col", "marker"],
        "markers": markers,
        "thresholds": thresholds,
        "missing": "NaN (no tissue tile covers this cell)",
        "cell_to_level0": "cell (row, col) is the square x in [col, col + 1) * step_px, "
                          "y in [row, row + 1) * step_px; its score is the window-weighted mean "
                          "of the tiles (tile_size_px wide) that cover it",
        "origin_px": [0, 0],
        "step_px": float(tiles.step),
        "tile_size_px": float(tiles.size),
        "tile_px": tiles.tile_px,
        "mpp": tiles.mpp,
        "slide_mpp": tiles.slide_mpp,
        "slide_width": tiles.slide_width,
        "slide_height": tiles.slide_height,
    }


def write_scores_csv(path: Path, tiles: Tiles, probs: np.ndarray, markers: list[str]) -> None:
    """One row per tile: x, y, w, h (level-0 px), row, col (score grid), tissue fraction and
    one probability column per marker."""
    rows, cols = tiles.rows, tiles.cols
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "w", "h", "row", "col", "tissue_fraction", *markers])
        for i in range(len(tiles.x)):
            writer.writerow([int(tiles.x[i]), int(tiles.y[i]), int(tiles.w[i]), int(tiles.h[i]),
                             int(rows[i]), int(cols[i]), f"{tiles.tissue_fraction[i]:.4f}",
                             *(f"{p:.6f}" for p in probs[i])])


def write_geojson(
    path: Path, tiles: Tiles, probs: np.ndarray, markers: list[str], thresholds: dict[str, float]
) -> None:
    """A FeatureCollection of tile polygons that QuPath imports as tile objects, classified by
    the markers above threshold and carrying one measurement per marker."""
    colors = {m: MARKER_COLORS[i % len(MARKER_COLORS)] for i, m in enumerate(markers)}
    features = []
    for i in range(len(tiles.x)):
        x, y, w, h = (int(v[i]) for v in (tiles.x, tiles.y, tiles.w, tiles.h))
        positive = [m for j, m in enumerate(markers) if probs[i, j] >= thresholds[m]]
        name = " ".join(f"{m}+" for m in positive) if positive else "Negative"
        color = list(colors[positive[0]]) if len(positive) == 1 else (
            [255, 215, 0] if positive else [160, 160, 160])
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "name": f"tile {i}",
                "classification": {"name": name, "color": color},
                "measurements": {**{m: round(float(probs[i, j]), 6)
                                    for j, m in enumerate(markers)},
                                 "tissue_fraction": round(float(tiles.tissue_fraction[i]), 4)},
            },
        })
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def stem_like_markers(model: dict[str, Any]) -> list[str]:
    """The markers the model's stem-like map joins (its metadata; none for other markers)."""
    from histocsc.learn.metadata import default_stem_like

    chosen = model.get("stem_like_markers")
    return list(default_stem_like(list(model["markers"])) if chosen is None else chosen)


def summarise(
    tiles: Tiles, probs: np.ndarray, markers: list[str], thresholds: dict[str, float],
    grid: np.ndarray, tissue_grid: np.ndarray, stem_like: list[str] | None = None,
) -> dict[str, Any]:
    """Tissue area, and per marker: mean probability, tiles above threshold and the share of the
    tissue above threshold, read from the heatmap's score grid as the heatmap shows it (each cell
    weighted by the tissue fraction blended the same way; without overlap the cells are the
    tiles). The stem-like area joins the `stem_like` markers (default: all); None without any."""
    stem_like = list(markers) if stem_like is None else stem_like
    cell_mm2 = float((tiles.step * tiles.slide_mpp) ** 2) / 1e6
    tissue_mm2 = float(np.sum(tiles.tissue_fraction)) * cell_mm2
    weight = np.nan_to_num(tissue_grid, nan=0.0).ravel()
    scores = grid.reshape(-1, len(markers))
    total = float(weight.sum())

    def share(positive: np.ndarray) -> float:
        return float(weight[positive].sum()) / total if total else 0.0

    per_marker = {}
    any_pos = np.zeros(len(scores), bool)
    for j, m in enumerate(markers):
        pos = np.nan_to_num(scores[:, j], nan=0.0) >= thresholds[m]
        if m in stem_like:
            any_pos |= pos
        per_marker[m] = {
            "threshold": thresholds[m],
            "mean_probability": float(probs[:, j].mean()) if len(probs) else None,
            "tiles_above_threshold": int((probs[:, j] >= thresholds[m]).sum()),
            "area_above_threshold_mm2": share(pos) * tissue_mm2,
            "area_fraction_above_threshold": share(pos),
        }
    return {
        "tiles": int(len(probs)),
        "tissue_area_mm2": tissue_mm2,
        "markers": per_marker,
        "stem_like": {
            "markers": stem_like,
            "definition": f"tissue above threshold for at least one of {', '.join(stem_like)}",
            "area_mm2": share(any_pos) * tissue_mm2,
            "area_fraction": share(any_pos),
        } if stem_like else None,
    }


def _extent(tiles: Tiles, thumb_mpp: float) -> tuple[float, float, float, float]:
    """imshow extent (thumbnail px) of the score grid: cell (r, c) covers its own square."""
    rows, cols = tiles.shape
    s = tiles.slide_mpp / thumb_mpp
    return (0.0, cols * tiles.step * s, rows * tiles.step * s, 0.0)


def _figure(thumbnail: np.ndarray, title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    h, w = thumbnail.shape[:2]
    scale = 10.0 / max(h, w)
    fig, ax = plt.subplots(figsize=(max(4.0, w * scale) + 2.0, max(4.0, h * scale) + 0.6),
                           dpi=max(100, round(max(h, w) / 10)))
    ax.imshow(thumbnail, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pil_kwargs={"compress_level": 3})
    plt.close(fig)


def plot_heatmap(
    path: Path, thumbnail: np.ndarray, thumb_mpp: float, tiles: Tiles, scores: np.ndarray,
    marker: str, threshold: float, slide_name: str,
) -> None:
    """One marker's probability over the thumbnail: semi-transparent colour map, colour bar,
    threshold contour and a legend."""
    from matplotlib.lines import Line2D

    fig, ax = _figure(thumbnail, f"{slide_name}: P({marker}+)")
    extent = _extent(tiles, thumb_mpp)
    img = ax.imshow(np.ma.masked_invalid(scores), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55,
                    extent=extent, interpolation="nearest")
    ax.set_xlim(0, thumbnail.shape[1])
    ax.set_ylim(thumbnail.shape[0], 0)
    bar = fig.colorbar(img, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(f"probability {marker}+")
    bar.ax.axhline(threshold, color="cyan", lw=1.5)
    above = np.nan_to_num(scores, nan=0.0) >= threshold
    handles = [Line2D([], [], color="cyan", lw=1.5, label=f"above threshold {threshold:.2f}")]
    if above.any() and not above.all():
        # outline along tile edges: contour a finely upsampled copy of the cell mask
        fine = np.kron(np.pad(above, 1).astype(np.float32), np.ones((8, 8), np.float32))
        x0, x1, y1, y0 = extent
        cw, ch = (x1 - x0) / above.shape[1], (y1 - y0) / above.shape[0]
        ax.contour(fine, levels=[0.5], colors="cyan", linewidths=0.8, origin="upper",
                   extent=(x0 - cw, x1 + cw, y1 + ch, y0 - ch))
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    _save(fig, path)


def plot_stem_map(
    path: Path, thumbnail: np.ndarray, thumb_mpp: float, tiles: Tiles, grid: np.ndarray,
    markers: list[str], thresholds: dict[str, float], slide_name: str,
) -> None:
    """Combined stem-like map: each tile coloured by which markers are above threshold."""
    from matplotlib.patches import Patch

    fig, ax = _figure(thumbnail, f"{slide_name}: stem-like regions (markers above threshold)")
    rows, cols = grid.shape[:2]
    overlay = np.zeros((rows, cols, 4), np.float32)
    code = np.zeros((rows, cols), np.int64)
    for j, m in enumerate(markers):
        code |= (np.nan_to_num(grid[..., j], nan=-1.0) >= thresholds[m]).astype(np.int64) << j
    handles = []
    for value in np.unique(code[code > 0]):
        names = [m for j, m in enumerate(markers) if value >> j & 1]
        if len(names) == 1:
            rgb = np.array(MARKER_COLORS[markers.index(names[0]) % len(MARKER_COLORS)]) / 255
        else:
            rgb = np.array([255, 215, 0]) / 255 if len(names) == len(markers) else \
                np.array([255, 105, 180]) / 255
        overlay[code == value] = (*rgb, 0.6)
        handles.append(Patch(facecolor=(*rgb, 0.6), label=" + ".join(f"{n}+" for n in names)))
    scored = ~np.isnan(grid[..., 0])
    overlay[scored & (code == 0)] = (0.5, 0.5, 0.5, 0.15)
    handles.append(Patch(facecolor=(0.5, 0.5, 0.5, 0.15), label="tissue, below thresholds"))
    ax.imshow(overlay, extent=_extent(tiles, thumb_mpp), interpolation="nearest")
    ax.set_xlim(0, thumbnail.shape[1])
    ax.set_ylim(thumbnail.shape[0], 0)
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    _save(fig, path)


def thumbnail_mpp(slide_width: int, slide_height: int, slide_mpp: float, floor_mpp: float) -> float:
    """A thumbnail resolution: at most THUMB_MAX_PX on the long side, never finer than floor."""
    return max(floor_mpp, max(slide_width, slide_height) * slide_mpp / THUMB_MAX_PX)
