"""Cells under H&E tiles: detect them on the IHC (only where tiles lie, in worker processes),
bring their centres into the H&E frame, and count them per tile.

The IHC region under the tiles is cut into chunks of CHUNK_PX (at `cells.cell_mpp`), each read
with a margin so that every cell lying across a chunk edge is seen whole; a cell belongs to the
chunk holding its centre, so none is counted twice. A chunk is processed only when a tile's
mapped footprint reaches it and the low-resolution IHC tissue map has tissue in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np

from histocsc.cpu import cpu_count
from histocsc.ihc.cells import CellConfig, Cells, detect_cells
from histocsc.workers import process_pool

CHUNK_PX = 1024  # chunk side at cell_mpp
MARGIN_UM = 15.0  # + cell expansion: read around each chunk
MAX_BINS = 20_000_000  # count_in_tiles: at most this many bins (coarser: edges rounded)


@dataclass(frozen=True)
class Chunk:
    """A level-0 IHC box whose cells are kept (`core`) and the larger box that is read."""

    core: tuple[int, int, int, int]  # x0, y0, x1, y1
    read: tuple[int, int, int, int]


@dataclass
class TileCells:
    """Per tile: detected cells, cells of class 1+ / 2+ / 3+, positive fraction, H-score."""

    cells: np.ndarray  # int
    by_class: np.ndarray  # (N, 4) int: negative, 1+, 2+, 3+
    positive_fraction: np.ndarray  # float, NaN without cells
    hscore: np.ndarray  # float 0-300, NaN without cells

    @staticmethod
    def from_counts(by_class: np.ndarray) -> TileCells:
        by_class = np.asarray(by_class, np.int64).reshape(-1, 4)
        n = by_class.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pos = np.where(n > 0, by_class[:, 1:].sum(axis=1) / n, np.nan)
            h = np.where(n > 0, 100.0 * (by_class @ np.arange(4)) / n, np.nan)
        return TileCells(n, by_class, pos, h)


def chunks_under_tiles(
    region: tuple[int, int, int, int], ihc_tile_centres: np.ndarray, reach: float,
    step: float, margin: float, tissue=None,
) -> list[Chunk]:
    """Chunks (level-0 side `step`) of the IHC `region` (x, y, w, h) within `reach` of a mapped
    tile centre; `tissue(x0, y0, x1, y1) -> bool` drops chunks without IHC tissue."""
    x, y, w, h = region
    nx, ny = max(1, math.ceil(w / step)), max(1, math.ceil(h / step))
    hit = np.zeros((ny, nx), bool)
    c = np.asarray(ihc_tile_centres, np.float64).reshape(-1, 2)
    # every chunk within `reach` of a centre: mark the chunk span of each centre's reach box
    i0 = np.clip(np.floor((c[:, 0] - reach - x) / step), 0, nx - 1).astype(int)
    i1 = np.clip(np.floor((c[:, 0] + reach - x) / step), -1, nx - 1).astype(int)
    j0 = np.clip(np.floor((c[:, 1] - reach - y) / step), 0, ny - 1).astype(int)
    j1 = np.clip(np.floor((c[:, 1] + reach - y) / step), -1, ny - 1).astype(int)
    for a0, a1, b0, b1 in zip(i0, i1, j0, j1, strict=True):
        hit[b0 : b1 + 1, a0 : a1 + 1] = True
    out = []
    for j, i in zip(*np.nonzero(hit), strict=True):
        cx0, cy0 = x + int(i * step), y + int(j * step)
        cx1, cy1 = min(x + w, x + int((i + 1) * step)), min(y + h, y + int((j + 1) * step))
        if tissue is not None and not tissue(cx0, cy0, cx1, cy1):
            continue
        m = int(math.ceil(margin))
        out.append(Chunk((cx0, cy0, cx1, cy1), (max(x, cx0 - m), max(y, cy0 - m),
                                                min(x + w, cx1 + m), min(y + h, cy1 + m))))
    return out


def detect_chunk(
    path: str, fallback_mpp: float | None, chunk: Chunk, cfg: CellConfig, nuclear: bool,
    dab_offset: float,
) -> Cells:
    """The cells whose centre lies in `chunk.core`, level-0 x, y of the IHC (a worker job)."""
    from histocsc.wsi.slide import open_slide

    x0, y0, x1, y1 = chunk.read
    with open_slide(path, fallback_mpp=fallback_mpp) as slide:
        mpp = max(cfg.cell_mpp, slide.mpp)
        rgb = slide.read(x0, y0, x1 - x0, y1 - y0, mpp)
    sx, sy = (x1 - x0) / rgb.shape[1], (y1 - y0) / rgb.shape[0]  # level-0 px per image px
    cells = detect_cells(rgb, sx * slide.mpp, cfg, nuclear, dab_offset)
    cells.x, cells.y = x0 + cells.x * sx, y0 + cells.y * sy
    cx0, cy0, cx1, cy1 = chunk.core
    keep = (cells.x >= cx0) & (cells.x < cx1) & (cells.y >= cy0) & (cells.y < cy1)
    return cells.select(keep)


def detect_slide_cells(
    path: str | Path, fallback_mpp: float | None, chunks: list[Chunk], cfg: CellConfig,
    nuclear: bool, dab_offset: float, workers: int | None = None,
) -> Cells:
    """Cells of every chunk, in `workers` processes (None: every usable core; 1: here)."""
    workers = min(workers or cpu_count(), len(chunks))
    args = (str(path), fallback_mpp)
    if workers <= 1:
        return Cells.concat([detect_chunk(*args, c, cfg, nuclear, dab_offset) for c in chunks])
    with process_pool(workers, _init_worker) as pool:
        futures = [pool.submit(detect_chunk, *args, c, cfg, nuclear, dab_offset) for c in chunks]
        return Cells.concat([f.result() for f in futures])


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def count_in_tiles(
    tiles_xywh: np.ndarray, x: np.ndarray, y: np.ndarray, classes: np.ndarray
) -> TileCells:
    """Cells of each class whose centre (x, y: H&E level-0) lies in each tile (x, y, w, h).

    Tiles may overlap: cells are binned on the coarsest lattice all tile edges lie on (the
    greatest common divisor of the tile coordinates), and each tile is a box sum of its bins.
    """
    xywh = np.asarray(tiles_xywh, np.int64).reshape(-1, 4)
    if not len(xywh):
        return TileCells.from_counts(np.zeros((0, 4)))
    x0, y0 = xywh[:, 0].min(), xywh[:, 1].min()
    edges = np.concatenate([xywh[:, 0] - x0, xywh[:, 1] - y0, xywh[:, 2], xywh[:, 3]])
    unit = max(1, int(reduce(math.gcd, edges.tolist(), 0)))
    span = float((xywh[:, 0] + xywh[:, 2]).max() - x0) * float((xywh[:, 1] + xywh[:, 3]).max() - y0)
    unit = max(unit, math.ceil(math.sqrt(span / MAX_BINS)))
    corners = np.stack([xywh[:, 0] - x0, xywh[:, 1] - y0, xywh[:, 0] - x0 + xywh[:, 2],
                        xywh[:, 1] - y0 + xywh[:, 3]], 1)
    boxes = np.rint(corners / unit).astype(np.int64)
    gw, gh = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    bx = np.floor((np.asarray(x) - x0) / unit).astype(np.int64)
    by = np.floor((np.asarray(y) - y0) / unit).astype(np.int64)
    inside = (bx >= 0) & (bx < gw) & (by >= 0) & (by < gh)
    flat = (by[inside] * gw + bx[inside]) * 4 + np.asarray(classes, np.int64)[inside]
    counts = np.bincount(flat, minlength=gw * gh * 4).reshape(gh, gw, 4)
    integral = np.zeros((gh + 1, gw + 1, 4), np.int64)
    integral[1:, 1:] = counts.cumsum(0).cumsum(1)
    a, b, c, d = boxes.T
    by_class = integral[d, c] - integral[b, c] - integral[d, a] + integral[b, a]
    return TileCells.from_counts(by_class)
