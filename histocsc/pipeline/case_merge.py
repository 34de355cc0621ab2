"""What a case's earlier `prepare` left that a new one keeps or reuses.

`prepare --markers A` after `prepare --markers B` into the same folder keeps B's results (its
`qc.json` record and its `labels.csv` columns) as long as the tile grid they were made on is the
same; a whole case is reused when the grid and every requested marker's parameters match.
A marker whose cohort cell is empty (no IHC for it in that case) gets the record of `no_ihc`:
labels -1, neither a QC failure nor a success.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from histocsc.io import read_json


def digest(*parts: Any) -> str:
    """A short, stable checksum of JSON-able parameters."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def marker_key(label_cfg: Any, marker: str, tiles_key: str, register_key: str | None) -> str:
    """The parameters of one marker's labels: its thresholds, the grid, its registration
    (None: no IHC). The cohort's marker selection is left out: it does not change the labels."""
    cfg = label_cfg.for_marker(marker).model_dump(mode="json", exclude={"markers", "per_marker"})
    return digest("labels", cfg, tiles_key, register_key)


def read_previous(qc_path: Path) -> dict[str, Any]:
    """The case's earlier qc.json, or {} when there is none or it is unreadable."""
    try:
        old = read_json(qc_path) if qc_path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def reusable(old: dict[str, Any], case_dir: Path, tiles_key: str, keys: dict[str, str]) -> bool:
    """Whether the earlier run finished the case with this grid and every marker's parameters."""
    if old.get("status") not in ("ok", "flagged") or old.get("tiles_params") != tiles_key:
        return False
    columns = label_columns(case_dir / "labels.csv")
    per = old.get("markers") or {}
    return all(
        isinstance(per.get(m), dict) and per[m].get("params") == key and f"{m}_label" in columns
        for m, key in keys.items()
    )


def label_columns(path: Path) -> list[str]:
    """The header of a labels.csv ([] when absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def kept_markers(
    old: dict[str, Any], case_dir: Path, tiles_key: str, markers: list[str], n_tiles: int
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]], list[str]]:
    """The earlier results of markers this run does not prepare: their qc.json records, their
    labels.csv columns (`<M>_*`, as text), and notes on what could not be kept."""
    others = [m for m in (old.get("markers") or {}) if m not in markers]
    if not others:
        return {}, {}, []
    if old.get("tiles_params") != tiles_key:
        return {}, {}, [f"{', '.join(others)}: earlier labels were made on another tile grid "
                        "and are dropped; prepare them again"]
    path = case_dir / "labels.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != n_tiles:
        return {}, {}, [f"{', '.join(others)}: {path} does not match the grid; dropped"]
    header = list(rows[0]) if rows else label_columns(path)
    mine = tuple(f"{m}_" for m in markers)
    columns = {c: [r[c] for r in rows] for m in others for c in header
               if c.startswith(f"{m}_") and not c.startswith(mine)}
    return {m: old["markers"][m] for m in others}, columns, []


def no_ihc(key: str, counts: dict[str, int]) -> dict[str, Any]:
    """The qc.json record of a marker the case has no IHC slide for."""
    return {"ihc": None, "no_ihc": True, "registration_ok": None, **counts, "params": key,
            "note": "no IHC slide in the cohort: labels -1 (ignored, not negative)"}
