"""When a finished slide may be skipped on a rerun of `infer`, and why it is redone otherwise.

Each finished slide folder holds `run_manifest.json`: what its outputs were made from (slide
file and checksum, model checksum, the slide pixel size used, tile parameters, output format
version). A rerun skips the slide only when all of these match the new request; otherwise it
recomputes and says which one changed. A folder made from another file of the same name is
refused (unless forced), so one `--out` never mixes up two slides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from histocsc.errors import DataError
from histocsc.io import read_json, write_json

MANIFEST = "run_manifest.json"
FORMAT_VERSION = 2  # of the per-slide outputs; bump when their content or layout changes
FIELDS = {
    "slide_checksum": "the slide file's content",
    "model_checksum": "the model",
    "slide_mpp": "the slide pixel size used",
    "tile_params": "the tile parameters",
    "format_version": "the output format version",
}


def make_manifest(slide_path: Path, slide_checksum: str, model_checksum: str, slide_mpp: float,
                  tile_params: dict[str, Any]) -> dict[str, Any]:
    """The manifest of one slide's run."""
    return {"slide_path": str(Path(slide_path).resolve()), "slide_checksum": slide_checksum,
            "model_checksum": model_checksum, "slide_mpp": float(slide_mpp),
            "tile_params": tile_params, "format_version": FORMAT_VERSION}


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "slide_mpp" and isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return math.isclose(old, new, rel_tol=1e-9)
    return bool(old == new)


def redo_reason(out_dir: Path, finished: bool, wanted: dict[str, Any], force: bool) -> str | None:
    """None when `out_dir` holds finished outputs matching `wanted` (skip); else why to redo it
    ("" for a slide never finished). DataError when the folder holds another slide's results."""
    if not finished:
        return ""
    path = out_dir / MANIFEST
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return "no run manifest from an earlier version; recomputing"
    if not isinstance(old, dict):
        return "unreadable run manifest; recomputing"
    if old.get("slide_path") != wanted["slide_path"] and not force:
        raise DataError(
            f"{out_dir} holds the results of {old.get('slide_path')}; {wanted['slide_path']} has "
            "the same name: use another --out (or --force to replace them)")
    if force:
        return "--force"
    for key, label in FIELDS.items():
        if not _same(key, old.get(key), wanted[key]):
            return f"{label} changed ({old.get(key)} -> {wanted[key]})"
    return None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Record what the outputs in `out_dir` were made from (before summary.json, written last)."""
    write_json(out_dir / MANIFEST, manifest)
