"""Per-tile encoder features, one HDF5 file per case in the CLAM / TRIDENT layout:

- dataset ``features`` (N, D) float32, one row per tile of the case's tile store, in its order;
- dataset ``coords`` (N, 2) int64, the tile's top-left corner in level-0 pixels;
- attributes ``encoder``, ``weights_checksum``, ``tile_px``, ``mpp``, ``histocsc_version``, and
  what decides whether the file is still valid: ``encoder_signature`` (architecture, kwargs,
  normalisation, embedding rule) and ``store_checksum`` (of the case's tiles.npy).

The same files feed CLAM-style MIL tools. Each file is written under a temporary name and
renamed, so an interrupted run leaves whole files only; a rerun skips the valid ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histocsc import __version__
from histocsc.errors import DataError, DataNotFoundError
from histocsc.io import atomic_path, file_checksum

FEATURES, COORDS = "features", "coords"


@dataclass
class CacheKey:
    """What a valid cache file must record."""

    encoder: str
    encoder_signature: str
    weights_checksum: str
    tile_px: int
    mpp: float

    def attrs(self, store_checksum: str) -> dict[str, Any]:
        return {"encoder": self.encoder, "encoder_signature": self.encoder_signature,
                "weights_checksum": self.weights_checksum, "tile_px": self.tile_px,
                "mpp": self.mpp, "histocsc_version": __version__,
                "store_checksum": store_checksum}


def encoder_signature(backbone: str, backbone_kwargs: dict[str, Any], mean: Any, std: Any,
                      embedding: str) -> str:
    """A stable text naming everything about the encoder that changes its features."""
    return json.dumps({"backbone": backbone, "kwargs": backbone_kwargs,
                       "mean": [round(float(v), 6) for v in mean],
                       "std": [round(float(v), 6) for v in std], "embedding": embedding},
                      sort_keys=True, default=str)


def cache_file(folder: str | Path, case: str) -> Path:
    return Path(folder) / f"{case}.h5"


def stale_reason(path: Path, key: CacheKey, store_checksum: str) -> str | None:
    """None if `path` holds valid features for `key` and this tile store, else why not."""
    import h5py

    if not path.is_file():
        return "not cached yet"
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
            n = f[FEATURES].shape[0] if FEATURES in f else -1
            if COORDS not in f or f[COORDS].shape[0] != n:
                return "unreadable cache (no coords matching the features)"
    except (OSError, KeyError) as exc:
        return f"unreadable cache ({exc})"
    if attrs.get("encoder_signature") != key.encoder_signature:
        return (f"the encoder changed ({attrs.get('encoder', '?')} {attrs.get('encoder_signature')}"
                f" -> {key.encoder} {key.encoder_signature})")
    if attrs.get("weights_checksum") != key.weights_checksum:
        return (f"the weights file changed ({attrs.get('weights_checksum') or 'none'} -> "
                f"{key.weights_checksum or 'none'})")
    if attrs.get("store_checksum") != store_checksum:
        return "the tile store changed (tiles.npy differs from the one cached)"
    if int(attrs.get("tile_px", -1)) != key.tile_px or not math.isclose(
            float(attrs.get("mpp", -1)), key.mpp, rel_tol=1e-6):
        return "the tile size or mpp changed"
    return None


def write_features(path: Path, features: np.ndarray, coords: np.ndarray,
                   attrs: dict[str, Any]) -> None:
    """Write one case's file atomically (temporary name, then rename)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(FEATURES, data=np.asarray(features, np.float32))
            f.create_dataset(COORDS, data=np.asarray(coords, np.int64))
            for k, v in attrs.items():
                f.attrs[k] = v


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features, coords, attributes) of one file."""
    import h5py

    if not path.is_file():
        raise DataNotFoundError(f"{path}: feature cache file not found")
    try:
        with h5py.File(path, "r") as f:
            return (np.asarray(f[FEATURES]), np.asarray(f[COORDS]),
                    {k: f.attrs[k] for k in f.attrs})
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: not a readable feature file ({exc})") from exc


def case_coords(folder: Path, n: int) -> np.ndarray:
    """Level-0 (x, y) of each tile of a prepared case (labels.csv rows follow tiles.npy)."""
    import csv

    path = folder / "labels.csv"
    if not path.is_file():
        raise DataNotFoundError(f"{path}: labels.csv not found (run `histocsc prepare` first)")
    with path.open(newline="") as f:
        rows = [(int(float(r["x"])), int(float(r["y"]))) for r in csv.DictReader(f)]
    if len(rows) != n:
        raise DataError(f"{path}: {len(rows)} rows but tiles.npy holds {n} tiles")
    return np.asarray(rows, np.int64).reshape(-1, 2)


@dataclass
class CaseResult:
    case: str
    path: Path
    tiles: int
    computed: bool
    reason: str  # why it was (re)computed, or "up to date"
    seconds: float = 0.0


Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float (N, D)
Progress = Callable[[int], None]


def cache_case(folder: Path, out_dir: Path, key: CacheKey, embed: Embedder, batch: int,
               advance: Progress | None = None) -> CaseResult:
    """Features of one prepared case, computed unless a valid file exists."""
    store_path = folder / "tiles.npy"
    if not store_path.is_file():
        raise DataNotFoundError(f"{store_path}: tile store not found (features need tiles.npy)")
    store = np.load(store_path, mmap_mode="r")
    checksum = file_checksum(store_path)
    path = cache_file(out_dir, folder.name)
    reason = stale_reason(path, key, checksum)
    if reason is None:
        if advance:
            advance(len(store))
        return CaseResult(folder.name, path, len(store), False, "up to date")
    started = time.perf_counter()
    coords = case_coords(folder, len(store))
    parts = []
    for i in range(0, len(store), batch):
        parts.append(embed(np.array(store[i:i + batch])))
        if advance:
            advance(len(parts[-1]))
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    write_features(path, features, coords, key.attrs(checksum))
    return CaseResult(folder.name, path, len(store), True, reason,
                      time.perf_counter() - started)
