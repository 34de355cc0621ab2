"""Truth for `histocsc evaluate`, read into per-marker rasters over the H&E slide.

Three kinds, told apart by what the path holds:

- phantom truth: a phantom case folder (or its truth.json): the planted marker masks;
- QuPath annotations: a GeoJSON file (FeatureCollection, Feature or list of features) whose
  Polygon / MultiPolygon features name a marker in `properties.classification.name` ("CD133",
  "CD133+", "CD133: positive" all name CD133); other classes and geometry types are ignored;
- IHC-derived labels: a case folder of `histocsc prepare` (labels.csv + grid.json): each pixel
  takes the mean label (1 / 0) of the labelled tiles covering it; unlabelled pixels are unknown.

A raster cell is `ds` level-0 px wide; its value is the positive share (0..1), NaN where unknown.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.errors import DataError

MAX_RASTER_PX = 8192
GEOJSON_SUFFIXES = {".geojson", ".json"}
EDGE_TOLERANCE = 0.01  # a polygon may overshoot the slide by this share of its width / height


@dataclass
class TruthRaster:
    """Per-marker truth over a width x height slide, at `ds` level-0 px per raster cell."""

    kind: str
    path: Path
    ds: float
    width: int
    height: int
    rasters: dict[str, np.ndarray]  # float32 (ceil(h/ds), ceil(w/ds)), NaN = unknown


def read_truth(path: str | Path, markers: list[str], width: int, height: int,
               step: float) -> TruthRaster:
    """Truth of any kind for the model's `markers` over a `width` x `height` slide; `step` (the
    score grid's cell in level-0 px) sets the raster resolution of annotation truth."""
    path = Path(path)
    ds = max(step / 4.0, max(width, height) / MAX_RASTER_PX)
    if (path.is_dir() and (path / "truth.json").is_file()) or path.name == "truth.json":
        truth = _phantom(path, markers, width, height)
    elif path.is_dir() and (path / "labels.csv").is_file():
        truth = _prepared(path, markers, width, height, ds)
    elif path.is_file() and path.suffix.lower() in GEOJSON_SUFFIXES:
        truth = _geojson(path, markers, width, height, ds)
    elif not path.exists():
        raise DataError(f"{path}: truth not found")
    else:
        raise DataError(f"{path}: not a truth source (a phantom case folder with truth.json, a "
                        "QuPath GeoJSON file, or a prepared case folder with labels.csv)")
    if not truth.rasters:
        raise DataError(f"{path}: names no marker of the model ({', '.join(markers)})")
    return truth


def _check_size(path: Path, size: tuple[int, int], width: int, height: int) -> None:
    if tuple(size) != (width, height):
        raise DataError(f"{path}: truth is for a {size[0]} x {size[1]} px slide but the "
                        f"prediction is for {width} x {height} px: it does not overlap this slide")


def _phantom(path: Path, markers: list[str], width: int, height: int) -> TruthRaster:
    from histocsc.synthetic.truth import load_mask, load_truth

    truth = load_truth(path)
    _check_size(path, (truth["he"]["width"], truth["he"]["height"]), width, height)
    named = [m for m in markers if m in truth["markers"]]
    if not named:
        raise DataError(f"{path}: names no marker of the model ({', '.join(markers)}); it has "
                        f"{', '.join(truth['markers']) or 'none'}")
    rasters = {m: load_mask(truth, m).astype(np.float32) for m in named}
    return TruthRaster("phantom", path, float(truth["mask_downsample"]), width, height, rasters)


def _shape(width: int, height: int, ds: float) -> tuple[int, int]:
    return math.ceil(height / ds), math.ceil(width / ds)


def _prepared(path: Path, markers: list[str], width: int, height: int, ds: float) -> TruthRaster:
    from histocsc.io import read_json

    grid = read_json(path / "grid.json") if (path / "grid.json").is_file() else {}
    if "slide_width" in grid:
        _check_size(path, (grid["slide_width"], grid["slide_height"]), width, height)
    with (path / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # a marker without one label >= 0 (no IHC for it in this case) is left out, not failed
    named = [m for m in markers if rows and f"{m}_label" in rows[0]
             and any(float(r[f"{m}_label"]) >= 0 for r in rows)]
    if not named:
        raise DataError(f"{path}/labels.csv: names no marker of the model ({', '.join(markers)})")
    try:
        boxes = np.array([[float(r[k]) for k in ("x", "y", "w", "h")] for r in rows]) / ds
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}/labels.csv: bad tile columns ({exc})") from exc
    boxes = np.rint(np.c_[boxes[:, :2], boxes[:, :2] + boxes[:, 2:]]).astype(np.int64)
    rasters = {}
    for m in named:
        labels = np.array([int(float(r[f"{m}_label"])) for r in rows])
        acc = np.zeros(_shape(width, height, ds), np.float64)
        count = np.zeros_like(acc)
        for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True):
            if label >= 0:
                acc[y0:y1, x0:x1] += label
                count[y0:y1, x0:x1] += 1
        with np.errstate(invalid="ignore"):
            rasters[m] = np.where(count > 0, acc / count, np.nan).astype(np.float32)
    return TruthRaster("ihc_labels", path, ds, width, height, rasters)


def marker_of(name: str, markers: list[str]) -> str | None:
    """The model marker a QuPath class name names ('CD133', 'CD133+', 'cd133: Positive')."""
    base = re.sub(r"(\+|\s*:?\s*positive)$", "", name.split(":")[0].strip(), flags=re.I).strip()
    lower = {m.lower(): m for m in markers}
    return lower.get(base.lower().rstrip("+").strip())


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [f for f in data if isinstance(f, dict)]
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise DataError(f"{path}: not GeoJSON features (expected a FeatureCollection)")


def _polygons(geometry: dict[str, Any]) -> list[list[np.ndarray]]:
    """Rings (outer first, then holes) of each polygon of a Polygon / MultiPolygon."""
    kind, coords = geometry.get("type"), geometry.get("coordinates") or []
    polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    return [[np.asarray(ring, np.float64).reshape(-1, 2) for ring in poly] for poly in polys]


def _geojson(path: Path, markers: list[str], width: int, height: int, ds: float) -> TruthRaster:
    import cv2

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    shape = _shape(width, height, ds)
    rasters: dict[str, np.ndarray] = {}
    names: set[str] = set()
    for index, feature in enumerate(_features(data, path)):
        props = feature.get("properties") or {}
        cls = props.get("classification") or {}
        name = str(cls.get("name", "")) if isinstance(cls, dict) else ""
        names.add(name or "(unclassified)")
        marker = marker_of(name, markers) if name else None
        if marker is None:
            continue
        for rings in _polygons(feature.get("geometry") or {}):
            if not len(rings) or len(rings[0]) < 3:
                continue
            outer = rings[0]
            _check_inside(path, index, feature, name, outer, width, height)
            one = np.zeros(shape, np.uint8)
            cv2.fillPoly(one, [np.rint(outer / ds * 16).astype(np.int32)], 1, shift=4)
            for hole in rings[1:]:
                cv2.fillPoly(one, [np.rint(hole / ds * 16).astype(np.int32)], 0, shift=4)
            rasters[marker] = np.maximum(rasters.get(marker, np.zeros(shape, np.float32)), one)
    if not rasters:
        raise DataError(f"{path}: names no marker of the model ({', '.join(markers)}) in "
                        f"properties.classification.name; classes found: "
                        f"{', '.join(sorted(names)) or 'none'}")
    return TruthRaster("qupath_geojson", path, ds, width, height, rasters)


def _check_inside(path: Path, index: int, feature: dict[str, Any], name: str, ring: np.ndarray,
                  width: int, height: int) -> None:
    """DataError when a polygon reaches off the slide by more than EDGE_TOLERANCE of its size
    (annotations drawn up to the tissue edge may overshoot it a little)."""
    x0, y0 = ring.min(axis=0)
    x1, y1 = ring.max(axis=0)
    tx, ty = EDGE_TOLERANCE * width, EDGE_TOLERANCE * height
    if x0 >= -tx and y0 >= -ty and x1 <= width + tx and y1 <= height + ty:
        return
    label = f"feature {index}" + (f" (id {feature['id']})" if feature.get("id") else "")
    raise DataError(
        f"{path}: {label}, class {name!r}: polygon x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} lies "
        f"outside the {width} x {height} px slide (coordinates must be level-0 pixels of this "
        "H&E: an annotation of another slide, or exported at another scale?)")
