"""Overlapping inference: the tile stride, and per-tile scores blended into a finer score grid.

With a stride below the tile size, every cell of the stride lattice (a square of `step` level-0
px) is covered by several tiles. Its score is the weighted mean of the tiles whose area holds the
cell's centre, each weighted by a Hann window evaluated where the cell lies inside that tile
(cells near a tile's centre count more than cells near its edge: the network sees their context).
Without overlap every cell is covered by exactly one tile and the grid equals the tile scores.
"""

from __future__ import annotations

import math

import numpy as np

from histocsc.errors import ConfigError
from histocsc.predict.outputs import Tiles

WINDOW = "hann"


def stride_px(tile_px: int, overlap: float | None = None, stride: int | None = None) -> int:
    """Step between tiles in model pixels from `--overlap F` (0 <= F < 1) or `--stride PX`."""
    if overlap is not None and stride is not None:
        raise ConfigError("give --overlap or --stride, not both")
    if stride is not None:
        if not 1 <= stride <= tile_px:
            raise ConfigError(f"--stride must be between 1 and the tile size {tile_px} px, "
                              f"got {stride}")
        return int(stride)
    if overlap is None:
        return int(tile_px)
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap must be at least 0 and below 1, got {overlap:g}")
    return max(1, round(tile_px * (1.0 - overlap)))


def window_weights(size: float, step: float) -> np.ndarray:
    """Weights of the cells a tile covers, by offset (0 .. k-1) from the tile's first cell:
    a Hann window at each cell centre's position inside the tile (symmetric, all > 0)."""
    k = max(1, math.ceil(size / step - 0.5))  # cells whose centre lies inside the tile
    pos = (np.arange(k) + 0.5) * step / size
    weights = np.sin(np.pi * np.clip(pos, 0.0, 1.0)) ** 2
    return np.maximum(weights, 1e-3)


def blend_grid(tiles: Tiles, probs: np.ndarray) -> np.ndarray:
    """(rows, cols, markers) float32 score grid at the stride; NaN where no tile covers a cell.

    Cell (r, c) is the square [c*step, (c+1)*step) x [r*step, (r+1)*step) in level-0 px."""
    rows, cols = tiles.shape
    markers = probs.shape[1]
    acc = np.zeros((rows, cols, markers), np.float64)
    wsum = np.zeros((rows, cols), np.float64)
    w1 = window_weights(tiles.size, tiles.step)
    r0, c0 = tiles.rows, tiles.cols
    p = probs.astype(np.float64)
    for a, wa in enumerate(w1):
        for b, wb in enumerate(w1):
            r, c = r0 + a, c0 + b
            keep = (r < rows) & (c < cols)
            np.add.at(acc, (r[keep], c[keep]), wa * wb * p[keep])
            np.add.at(wsum, (r[keep], c[keep]), wa * wb)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = acc / wsum[..., None]
    grid[wsum == 0] = np.nan
    return grid.astype(np.float32)


def tiles_per_cell(tiles: Tiles) -> int:
    """How many tiles cover an inner cell."""
    return len(window_weights(tiles.size, tiles.step)) ** 2
