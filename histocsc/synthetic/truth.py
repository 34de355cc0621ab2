"""Read a phantom case's ground truth: slides, transforms, landmarks, marker masks, tile labels.

`OUT/<case>/truth.json` (paths inside are relative to the case folder):
    {"case", "seed", "he": {"path", "width", "height", "mpp"}, "mask_downsample": 16,
     "markers": {"CD133": {"ihc": {...}, "mask": "mask_CD133.png",
                           "transform": {...}, "landmarks": [[x_he, y_he, x_ihc, y_ihc], ...],
                           "landmark_features": ["lumen" | "stem" | "tissue", ...]}},
     "tissue_mask": "mask_tissue.png", "stem_regions": [{"x", "y", "radius", "markers"}], ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histocsc.errors import DataError, DataNotFoundError
from histocsc.io import read_json
from histocsc.synthetic.transform import SectionTransform

TRUTH_NAME = "truth.json"


def load_truth(case_dir: str | Path) -> dict[str, Any]:
    """Read `case_dir/truth.json`; slide and mask paths come back absolute."""
    case_dir = Path(case_dir)
    path = case_dir / TRUTH_NAME if case_dir.is_dir() else case_dir
    if not path.is_file():
        raise DataNotFoundError(f"{path}: phantom truth file not found")
    try:
        truth = read_json(path)
        root = path.parent.resolve()
        truth["case_dir"] = str(root)
        truth["he"]["path"] = str(root / truth["he"]["path"])
        if "tissue_mask" in truth:
            truth["tissue_mask"] = str(root / truth["tissue_mask"])
        for entry in truth["markers"].values():
            entry["ihc"]["path"] = str(root / entry["ihc"]["path"])
            entry["mask"] = str(root / entry["mask"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a phantom truth file ({exc})") from exc
    return truth


def _marker(truth: dict[str, Any], marker: str) -> dict[str, Any]:
    try:
        return truth["markers"][marker]
    except KeyError:
        known = ", ".join(truth.get("markers", {}))
        raise DataError(
            f"{truth.get('case_dir', 'truth')}: no marker {marker!r} (has {known})"
        ) from None


def transform(truth: dict[str, Any], marker: str) -> SectionTransform:
    """The H&E -> IHC transform of `marker`'s section."""
    return SectionTransform.from_dict(_marker(truth, marker)["transform"])


def he_to_ihc(truth: dict[str, Any], marker: str, pts: np.ndarray) -> np.ndarray:
    """Map H&E level-0 points (N, 2) to the marker's IHC level-0 points."""
    return transform(truth, marker).forward(pts)


def ihc_to_he(truth: dict[str, Any], marker: str, pts: np.ndarray) -> np.ndarray:
    """Map the marker's IHC level-0 points (N, 2) back to H&E level-0 points."""
    return transform(truth, marker).inverse(pts)


def landmarks(truth: dict[str, Any], marker: str) -> np.ndarray:
    """(N, 4) array of [x_he, y_he, x_ihc, y_ihc] pairs."""
    return np.asarray(_marker(truth, marker)["landmarks"], np.float64).reshape(-1, 4)


def load_mask(truth: dict[str, Any], marker: str) -> np.ndarray:
    """Marker-positive region (bool), H&E level-0 coordinates divided by `mask_downsample`.

    `marker="tissue"` gives the tissue mask (tissue pieces, before lumina are cut out).
    """
    entry = truth.get("tissue_mask") if marker == "tissue" else _marker(truth, marker)["mask"]
    if entry is None:
        raise DataError(f"{truth.get('case_dir', 'truth')}: no tissue mask recorded")
    path = Path(entry)
    if not path.is_absolute():
        path = Path(truth.get("case_dir", ".")) / path
    if not path.is_file():
        raise DataNotFoundError(f"{path}: marker mask not found")
    return np.asarray(Image.open(path).convert("L")) > 127


def _xywh(grid: Any) -> np.ndarray:
    """(N, 4) float boxes from a TileGrid, a dict/table of columns, or an (N, 4) array."""
    table = getattr(grid, "table", grid)
    if isinstance(table, np.ndarray) and table.dtype.names is None:
        return np.asarray(table, np.float64).reshape(-1, 4)
    cols = []
    for name in ("x", "y", "w", "h"):
        col = table[name] if not hasattr(table, name) else getattr(table, name)
        cols.append(np.asarray(col, np.float64))
    return np.stack(cols, 1)


def truth_labels(truth: dict[str, Any], marker: str, grid: Any) -> np.ndarray:
    """Fraction (0..1) of each tile's area that is marker-positive in the truth mask.

    `grid`: a TileGrid (uses its `table` columns x, y, w, h, level-0 px of the H&E), a mapping of
    those columns, or an (N, 4) array of x, y, w, h. Exact area weighting over mask cells.
    """
    boxes = _xywh(grid)
    mask = load_mask(truth, marker).astype(np.float64)
    total, area = box_integrals(mask, float(truth["mask_downsample"]), boxes)
    return np.clip(total / np.maximum(area, 1e-12), 0.0, 1.0)


def box_integrals(image: np.ndarray, ds: float, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of `image` (a raster of level-0 px / `ds`) over each level-0 box (N, 4: x, y, w, h),
    exact for boxes that cut raster cells (bilinear integral image), and each box's area in
    raster cells."""
    integral = np.zeros((image.shape[0] + 1, image.shape[1] + 1))
    integral[1:, 1:] = image.cumsum(0).cumsum(1)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Integral of the image over [0, x) x [0, y) in raster cells, bilinear (exact)."""
        x = np.clip(x, 0, image.shape[1])
        y = np.clip(y, 0, image.shape[0])
        x0 = np.minimum(np.floor(x).astype(int), image.shape[1] - 1)
        y0 = np.minimum(np.floor(y).astype(int), image.shape[0] - 1)
        fx, fy = x - x0, y - y0
        return ((1 - fx) * (1 - fy) * integral[y0, x0] + fx * (1 - fy) * integral[y0, x0 + 1]
                + (1 - fx) * fy * integral[y0 + 1, x0] + fx * fy * integral[y0 + 1, x0 + 1])

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0 = boxes[:, 0] / ds, boxes[:, 1] / ds
    x1, y1 = (boxes[:, 0] + boxes[:, 2]) / ds, (boxes[:, 1] + boxes[:, 3]) / ds
    area = (x1 - x0) * (y1 - y0)
    return at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0), area
