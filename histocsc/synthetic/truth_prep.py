"""A prepared cohort labelled from phantom truth masks instead of registered IHC.

For tests, benchmarks and GPU checks: it needs no registration, so what it measures is the
training alone. Layout as `histocsc prepare` writes it: DIR/cohort.csv, DIR/<case>/grid.csv,
grid.json, tiles.npy and labels.csv (`<M>_fraction`, `<M>_label`).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from histocsc.errors import DataError
from histocsc.io import atomic_path


def prepare_from_truth(
    phantom_dir: str | Path,
    out_dir: str | Path,
    tiles_cfg: object | None = None,
    positive: float = 0.5,
    negative: float = 0.05,
    workers: int = 1,
) -> Path:
    """Tile every H&E of `phantom_dir/cohort.csv` (with the tile store) and label each tile
    from the truth masks: 1 when at least `positive` of it is marker-positive, 0 when at most
    `negative`, else -1. Returns `out_dir`."""
    from histocsc.cohort import read_cohort
    from histocsc.synthetic.truth import load_truth, truth_labels
    from histocsc.wsi.extract import SlideTask, tile_slides
    from histocsc.wsi.grid import TileGrid, TilesConfig

    phantom_dir, out_dir = Path(phantom_dir), Path(out_dir)
    cohort = read_cohort(phantom_dir / "cohort.csv")
    cfg = tiles_cfg if tiles_cfg is not None else TilesConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(phantom_dir / "cohort.csv", out_dir / "cohort.csv")
    tasks = [SlideTask(path=c.he, out_dir=out_dir / c.case) for c in cohort.cases]
    for result in tile_slides(tasks, cfg, save_images=True, workers=workers):
        if result.error:
            raise DataError(f"{result.path}: tiling failed: {result.error}")
    for case in cohort.cases:
        grid = TileGrid.load(out_dir / case.case)
        truth = load_truth(phantom_dir / case.case)
        cols = {k: np.asarray(v) for k, v in grid.table.items()}
        fractions = {m: truth_labels(truth, m, grid) for m in cohort.markers}
        header = [*cols, *(f"{m}_{k}" for m in cohort.markers for k in ("fraction", "label"))]
        with atomic_path(out_dir / case.case / "labels.csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(len(grid)):
                row: list[object] = [cols[k][i] for k in cols]
                for m in cohort.markers:
                    frac = float(fractions[m][i])
                    label = 1 if frac >= positive else 0 if frac <= negative else -1
                    row += [f"{frac:.4f}", label]
                writer.writerow(row)
    return out_dir
