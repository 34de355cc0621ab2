"""The gate an int8 / fp16 variant must pass before it is written.

The variant is compared with the fp32 graph on tiles not used for its calibration. With labelled
tiles (the run's test or validation cases, when their tile stores are at hand) the per-marker
AUROC may change by at most `max_auroc_change`; otherwise every probability may move by at most
`max_prob_diff`. A failing variant is deleted and the export stops, saying by how much it failed.
AUROC is torchmetrics' (the one training reports).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.errors import ModelError


@dataclass(frozen=True)
class GateLimits:
    """How far a variant may move from fp32."""

    max_auroc_change: float = 0.01
    max_prob_diff: float = 0.05


def _digests(tiles: np.ndarray) -> set[str]:
    return {hashlib.sha1(t.tobytes()).hexdigest() for t in tiles}


def unseen(tiles: np.ndarray, calibration: np.ndarray | None) -> np.ndarray:
    """Indices of `tiles` that are not among the calibration tiles."""
    if calibration is None:
        return np.arange(len(tiles))
    seen = _digests(calibration)
    return np.array([i for i, t in enumerate(tiles)
                     if hashlib.sha1(t.tobytes()).hexdigest() not in seen], dtype=np.int64)


def _auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.from_numpy(probs.astype(np.float32)),
                              torch.from_numpy(labels.astype(np.int64))))


def auroc_changes(ref: np.ndarray, got: np.ndarray, labels: np.ndarray,
                  markers: list[str]) -> dict[str, float]:
    """|AUROC(variant) - AUROC(fp32)| per marker with both classes among the labels."""
    out = {}
    for j, marker in enumerate(markers):
        known = labels[:, j] >= 0
        y = labels[known, j]
        if (y == 1).any() and (y == 0).any():
            out[marker] = abs(_auroc(got[known, j], y) - _auroc(ref[known, j], y))
    return out


def check_variant(path: Path, name: str, ref: np.ndarray, got: np.ndarray,
                  labels: np.ndarray | None, markers: list[str], limits: GateLimits) -> str:
    """One line saying how the variant compares; deletes it and raises ModelError if it fails."""
    n = len(ref)
    changes = auroc_changes(ref, got, labels, markers) if labels is not None else {}
    if changes:
        worst = max(changes, key=lambda m: changes[m])
        value, limit, what = changes[worst], limits.max_auroc_change, f"AUROC change ({worst})"
        where = f"{n} labelled tiles not used for calibration"
    else:
        value = float(np.max(np.abs(got.astype(np.float64) - ref))) if n else 0.0
        limit, what = limits.max_prob_diff, "max probability difference"
        where = f"{n} tiles not used for calibration"
    line = f"{name}: {what} {value:.4f} vs fp32 on {where} (limit {limit:g})"
    if not value <= limit:
        path.unlink(missing_ok=True)
        raise ModelError(f"{path}: {name} variant refused, not written: its {what} is {value:.4f},"
                         f" {value - limit:.4f} over the limit {limit:g}, on {where}")
    return line


def labelled_run_tiles(meta: dict[str, Any], tile_px: int,
                       limit: int = 512) -> tuple[np.ndarray, np.ndarray] | None:
    """Tiles and labels (N, markers; -1 unknown) of the run's test cases (else validation
    cases) from their tile stores; None when the run does not name them or they are gone."""
    from histocsc.learn.data import DataConfig, load_case

    data = (meta.get("summary") or {}).get("data") or {}
    root, markers = data.get("root"), list(meta.get("markers", []))
    cases = (data.get("test") or {}).get("cases") or (data.get("val") or {}).get("cases") or []
    if not root or not cases:
        return None
    tiles, labels = [], []
    for case in cases:
        folder = Path(root) / case
        store = folder / "tiles.npy"
        try:
            loaded = load_case(folder, markers, DataConfig(), seed=0)
            if loaded is None or not store.is_file():
                continue
            arr = np.load(store, mmap_mode="r")
        except Exception:  # noqa: BLE001 - a store gone or unreadable: no labels from it
            continue
        if arr.shape[1:] != (tile_px, tile_px, 3) or not len(loaded.rows):
            continue
        tiles.append(np.asarray(arr[loaded.rows]))
        labels.append(loaded.labels)
    if not tiles:
        return None
    all_tiles, all_labels = np.concatenate(tiles), np.concatenate(labels)
    if len(all_tiles) > limit:
        pick = np.linspace(0, len(all_tiles) - 1, limit).round().astype(int)
        all_tiles, all_labels = all_tiles[pick], all_labels[pick]
    return np.ascontiguousarray(all_tiles), all_labels
