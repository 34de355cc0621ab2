"""The cases of a prepared cohort: each case's labelled tiles, read from its folder, and its QC
flags (`histocsc.learn.data` builds datasets from them)."""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histocsc.errors import DataError, DataNotFoundError

if TYPE_CHECKING:  # data.py imports this module
    from histocsc.learn.data import DataConfig


@dataclass
class CaseTiles:
    """One prepared case: its tile table rows that survive filtering, and labels per marker."""

    case: str
    folder: Path
    labels: np.ndarray  # (n, markers) int8: 1, 0, -1 ignored
    rows: np.ndarray  # row indices into grid / tiles.npy
    boxes: np.ndarray  # (n, 4) level-0 x, y, w, h
    tile_px: int
    mpp: float
    slide_path: Path | None
    notes: list[str] = field(default_factory=list)


def _read_labels(path: Path, markers: list[str]) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Tile boxes, tissue fraction and one label column per marker; a marker without a
    `<M>_label` column (never prepared for this case) is all -1 (ignored) and listed third."""
    if not path.is_file():
        raise DataNotFoundError(f"{path}: labels.csv not found (run `histocsc prepare` first)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [c for c in ("x", "y", "w", "h") if c not in header]
        if absent:
            raise DataError(f"{path}: no column(s) {', '.join(absent)} (not a labels.csv?)")
        cols: dict[str, list[str]] = {c: [] for c in header}
        for row in reader:
            for c in header:
                cols[c].append(row[c])
    n = len(cols["x"])
    out: dict[str, np.ndarray] = {}
    try:
        for c in ("x", "y", "w", "h"):
            out[c] = np.asarray(cols[c], dtype=np.float64).astype(np.int64)
        out["tissue_fraction"] = (
            np.asarray(cols["tissue_fraction"], dtype=np.float32)
            if "tissue_fraction" in cols
            else np.ones(n, np.float32)
        )
        for m in markers:
            values = cols.get(f"{m}_label")
            out[m] = (np.full(n, -1, np.int8) if values is None
                      else np.asarray(values, dtype=np.float64).astype(np.int8))
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric value ({exc})") from exc
    return out, n, [m for m in markers if f"{m}_label" not in header]


def qc_flags(case_dir: Path, markers: list[str]) -> tuple[bool, set[str]]:
    """(skip the whole case, markers whose labels to ignore) from the case's qc.json.

    A qc.json listing per-marker results flags only the markers whose registration_ok is
    false (the case is skipped when that is all of them); one without per-marker results
    and registration_ok false flags the whole case. No qc.json: nothing flagged.
    """
    path = case_dir / "qc.json"
    if not path.is_file():
        return False, set()
    try:
        qc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(qc, dict):
        raise DataError(f"{path}: expected a JSON object")
    per = qc.get("markers")
    if isinstance(per, dict) and per:
        bad = {
            m
            for m in markers
            if isinstance(per.get(m), dict) and per[m].get("registration_ok") is False
        }
        return len(bad) == len(markers), bad
    return qc.get("registration_ok") is False, set()


def load_case(folder: Path, markers: list[str], cfg: DataConfig, seed: int) -> CaseTiles | None:
    """Read one case's labels and grid metadata; None when QC flags the whole case."""
    case_bad, bad_markers = qc_flags(folder, markers) if cfg.skip_failed_qc else (False, set())
    if case_bad:
        return None
    cols, n, unprepared = _read_labels(folder / "labels.csv", markers)
    grid_json = folder / "grid.json"
    if not grid_json.is_file():
        raise DataNotFoundError(f"{grid_json}: grid sidecar not found")
    try:
        grid = json.loads(grid_json.read_text())
        tile_px, mpp = int(grid["tile_px"]), float(grid["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{grid_json}: unreadable grid metadata ({exc})") from exc
    labels = np.stack([cols[m] for m in markers], axis=1) if n else np.zeros((0, len(markers)))
    labels = labels.astype(np.int8)
    notes = [f"{m}: no {m}_label column (not prepared for this case), labels ignored"
             for m in unprepared]
    for j, m in enumerate(markers):
        if m in bad_markers:
            labels[:, j] = -1
            notes.append(f"{m}: registration QC failed (qc.json), labels ignored")
    keep = (cols["tissue_fraction"] >= cfg.min_tissue_fraction) & (labels >= 0).any(axis=1)
    rows = np.flatnonzero(keep)
    if cfg.max_tiles_per_case is not None and len(rows) > cfg.max_tiles_per_case:
        rng = np.random.default_rng([seed, zlib.crc32(folder.name.encode())])
        rows = np.sort(rng.choice(rows, cfg.max_tiles_per_case, replace=False))
    boxes = np.stack([cols[c] for c in ("x", "y", "w", "h")], axis=1) if n else np.zeros((0, 4))
    slide = grid.get("slide_path")
    return CaseTiles(
        case=folder.name,
        folder=folder,
        labels=labels[rows],
        rows=rows,
        boxes=boxes[rows].astype(np.int64),
        tile_px=tile_px,
        mpp=mpp,
        slide_path=Path(slide) if slide else None,
        notes=notes,
    )
