"""The ONNX model metadata codec: what export writes into `metadata_props` and inference reads.

Both halves live here so they cannot drift apart. No torch: inference imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histocsc import __version__
from histocsc.errors import ModelError

# Markers of cancer stem-like cells: a model's "stem-like" map joins those of its markers that are
# in this set unless export is told otherwise (`--stem-like`); other markers get no stem-like map.
STEM_CELL_MARKERS = frozenset({"CD133", "PROM1", "CD44", "ALDH1", "ALDH1A1", "LGR5", "SOX2",
                               "OCT4", "NANOG", "CD24", "CD90", "EPCAM", "CD166", "BMI1"})


def default_stem_like(markers: list[str]) -> list[str]:
    """The markers that make up the stem-like map when export was not told: the model's markers
    that are stem-cell markers (STEM_CELL_MARKERS, case-insensitive), in model order."""
    return [m for m in markers if m.upper() in STEM_CELL_MARKERS]


def check_stem_like(stem_like: list[str], markers: list[str]) -> list[str]:
    """`stem_like` checked against the model's markers (ModelError naming the stranger)."""
    strangers = [m for m in stem_like if m not in markers]
    if strangers:
        raise ModelError(f"stem-like marker(s) {', '.join(strangers)} are not among the model's "
                         f"markers ({', '.join(markers)})")
    return list(dict.fromkeys(stem_like))


def model_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The `metadata_props` strings written into every exported graph."""
    try:
        markers = list(meta["markers"])
        tile_px = int(meta["tile_px"])
        mpp = float(meta["mpp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model metadata lacks markers/tile_px/mpp: {exc}") from exc
    thresholds = meta.get("thresholds") or {m: 0.5 for m in markers}
    stem_like = meta.get("stem_like_markers")
    stem_like = default_stem_like(markers) if stem_like is None else check_stem_like(
        list(stem_like), markers)
    return {
        "markers": json.dumps(markers),
        "tile_px": str(tile_px),
        "mpp": repr(mpp),
        "thresholds": json.dumps(thresholds),
        "histocsc_version": __version__,
        "training_summary": json.dumps(meta.get("summary") or {}, default=str),
        "backbone": str(meta.get("backbone", "")),
        "mean": json.dumps(list(map(float, meta.get("mean", [0.0, 0.0, 0.0])))),
        "std": json.dumps(list(map(float, meta.get("std", [1.0, 1.0, 1.0])))),
        "calibration": json.dumps({"applied_in": "graph", **(meta.get("calibration") or {})}),
        "stem_like_markers": json.dumps(stem_like),
    }


def decode_metadata(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """Turn the raw metadata strings into typed values; ModelError if a key is missing."""
    missing = [k for k in ("markers", "tile_px", "mpp") if k not in props]
    if missing:
        raise ModelError(f"{path}: not a histocsc model, metadata lacks {', '.join(missing)}")
    try:
        out: dict[str, Any] = {
            "markers": [str(m) for m in json.loads(props["markers"])],
            "tile_px": int(props["tile_px"]),
            "mpp": float(props["mpp"]),
            "thresholds": dict(json.loads(props.get("thresholds", "{}"))),
            "histocsc_version": props.get("histocsc_version", ""),
            "training_summary": json.loads(props.get("training_summary", "{}")),
            "backbone": props.get("backbone", ""),
            "precision": props.get("precision", "fp32"),
            "calibration": json.loads(props.get("calibration", "{}")),
        }
        # models exported before the key existed: the stem-cell markers among theirs
        stem_like = props.get("stem_like_markers")
        out["stem_like_markers"] = (default_stem_like(out["markers"]) if stem_like is None else
                                    check_stem_like([str(m) for m in json.loads(stem_like)],
                                                    out["markers"]))
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: malformed histocsc metadata ({exc})") from exc
    for m in out["markers"]:
        out["thresholds"].setdefault(m, 0.5)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decode an exported model's `metadata_props` (markers, tile_px, mpp, thresholds, ...)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    return decode_metadata({p.key: p.value for p in proto.metadata_props}, path)
