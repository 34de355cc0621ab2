"""A prepared case's label files: labels.csv (one row a tile) and the label_map_<M>.png pictures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.ihc.labels import LabelConfig, MarkerLabels, write_label_map
from histocsc.io import atomic_path

CELL_COLUMNS = ("cells", "positive_cells", "hscore")


def write_labels_csv(path: Path, grid: dict[str, np.ndarray], labels: dict[str, MarkerLabels],
                     kept: dict[str, list[str]] | None = None):
    """`labels.csv`: every grid column, then `<M>_fraction` (nan: no IHC tissue) and `<M>_label`;
    for a marker whose cells were detected also `<M>_cells`, `<M>_positive_cells` (1+ or more)
    and `<M>_hscore` (0-300, nan without cells); then `kept`: columns of other markers from an
    earlier run, as text."""
    header: list[str] = list(grid)
    columns: list[Any] = list(grid.values())
    for m, result in labels.items():
        header += [f"{m}_fraction", f"{m}_label"]
        columns += [result.fraction, result.label]
        if result.cells is not None:
            header += [f"{m}_{c}" for c in CELL_COLUMNS]
            positive = result.cells.by_class[:, 1:].sum(axis=1)
            columns += [result.cells.cells, positive, result.cells.hscore]
    header += list(kept or {})
    columns += list((kept or {}).values())
    n = len(columns[0]) if columns else 0
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            writer.writerow([_cell(col[i]) for col in columns])


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (np.floating, float)):
        return "nan" if not np.isfinite(value) else f"{float(value):.6g}"
    return str(int(value))


def unlabelled(n: int) -> MarkerLabels:
    return MarkerLabels(
        fraction=np.full(n, np.nan), tissue=np.zeros(n), label=np.full(n, -1, np.int8)
    )


def label_counts(label: np.ndarray) -> dict[str, int]:
    return {
        "positive": int((label == 1).sum()),
        "negative": int((label == 0).sum()),
        "ignored": int((label == -1).sum()),
    }


def write_label_maps(
    he: Path,
    case_dir: Path,
    xywh: np.ndarray,
    he_size: tuple[int, int],
    results: dict[str, MarkerLabels],
    cfg: LabelConfig,
    he_mpp: float | None = None,
) -> None:
    from histocsc.wsi.slide import open_slide

    with open_slide(he, fallback_mpp=he_mpp) as slide:
        mpp = max(slide.mpp, max(he_size) * slide.mpp / cfg.label_map_max_px)
        thumb = slide.thumbnail(mpp)
    scale = thumb.shape[1] / he_size[0]
    for marker, result in results.items():
        points = result.cell_points if cfg.label_map_cells else None
        write_label_map(case_dir / f"label_map_{marker}.png", thumb, scale, xywh, result.label,
                        cell_points=points)
