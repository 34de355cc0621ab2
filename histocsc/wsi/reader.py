"""Read runs of neighbouring tiles of one slide, fast: the reader `tiles` and `infer` share.

Tiles are read a row-run at a time (up to `MAX_RUN` neighbouring tiles per read) through
`Slide.read_level0_raw` of a slide opened with `fast_tiles` (direct TIFF tiles for Aperio SVS and
generic tiled TIFFs, OpenSlide with a large tile cache for other formats, the shared decoded
copy for plain images). Tiles whose mpp is not level 0's are resized with an area filter (from
level 0 when that is the level `Slide.read` would pick, else through `Slide.read`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from histocsc.wsi.slide import open_slide

MAX_RUN = 24  # neighbouring tiles read as one region


class TileReader:
    """Reads runs of neighbouring tiles of one slide; one reader per thread or process."""

    def __init__(self, path: Path, slide_mpp: float | None, fast_tiles: bool = True) -> None:
        self.slide = open_slide(path, mpp=slide_mpp, fast_tiles=fast_tiles)
        self._tiles = np.empty(0, np.uint8)

    def read_runs(self, boxes: np.ndarray, tile_px: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first index, tiles) for runs of neighbouring tiles at `boxes` (level-0
        x, y, w, h), each tile resized to tile_px; the tiles array is reused between runs."""
        slide = self.slide
        for i, j in runs(boxes, MAX_RUN):
            x0, y0, size0 = int(boxes[i, 0]), int(boxes[i, 1]), int(boxes[i, 2])
            x1 = int(boxes[j - 1, 0] + boxes[j - 1, 2])
            offsets = boxes[i:j, 0] - x0
            code = None
            if size0 == tile_px:
                region, code = slide.read_level0_raw(x0, y0, x1 - x0, size0), slide.raw_conversion
            else:
                scale = tile_px / size0
                width = max(tile_px, round((x1 - x0) * scale))
                if slide.raw_conversion is None and self._level0_is_best(size0 / tile_px):
                    region = slide.read_level0_raw(x0, y0, x1 - x0, size0)
                    region = cv2.resize(region, (width, tile_px), interpolation=cv2.INTER_AREA)
                else:
                    region = slide.read(x0, y0, x1 - x0, size0, out_size=(width, tile_px))
                offsets = np.minimum(np.round(offsets * scale).astype(int), width - tile_px)
            tiles = self._tile_buffer(j - i, tile_px)
            for k, off in enumerate(offsets):
                tile = region[:, off : off + tile_px]
                if code is None:
                    tiles[k] = tile
                else:
                    cv2.cvtColor(tile, code, dst=tiles[k])
            yield i, tiles

    def close(self) -> None:
        """Release the slide."""
        self.slide.close()

    def _tile_buffer(self, n: int, tile_px: int) -> np.ndarray:
        if self._tiles.shape[1:] != (tile_px, tile_px, 3) or len(self._tiles) < n:
            self._tiles = np.empty((max(n, MAX_RUN), tile_px, tile_px, 3), np.uint8)
        return self._tiles[:n]

    def _level0_is_best(self, downsample: float) -> bool:
        """True when no pyramid level other than 0 is fine enough for `downsample` (so
        `Slide.read` would read level 0 too)."""
        others = self.slide.level_downsamples[1:]
        return downsample < 1 or all(ds > downsample * (1 + 1e-6) for ds in others)


def runs(boxes: np.ndarray, max_run: int) -> Iterator[tuple[int, int]]:
    """Index ranges [i, j) of neighbouring tiles on one row, at most `max_run` long."""
    n = len(boxes)
    i = 0
    while i < n:
        j = i + 1
        while (
            j < n
            and j - i < max_run
            and boxes[j, 1] == boxes[i, 1]
            and 0 < boxes[j, 0] - boxes[j - 1, 0] <= boxes[j - 1, 2]
        ):
            j += 1
        yield i, j
        i = j


_READERS: dict[tuple[str, float | None], TileReader] = {}


def process_reader(path: Path, slide_mpp: float | None) -> TileReader:
    """One reader per process and file, reused across chunks (keeps the tile cache warm)."""
    key = (str(path), slide_mpp)
    if key not in _READERS:
        close_readers()  # one slide at a time per process: free the previous one
        _READERS[key] = TileReader(path, slide_mpp)
    return _READERS[key]


def close_readers() -> None:
    """Close this process's cached slide readers."""
    for reader in _READERS.values():
        reader.close()
    _READERS.clear()
