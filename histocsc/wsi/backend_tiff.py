"""Direct TIFF tiles: level 0 of an Aperio SVS or generic tiled TIFF decoded without OpenSlide.

The stored tiles are decoded with tifffile + imagecodecs (JPEG, JPEG 2000, ...: the codecs OpenSlide
uses), minus OpenSlide's ARGB compositing and copies, with a cache holding the slide rows that a run
of tiles spans, so each stored tile is decoded once. Everything else (metadata, other levels,
`Slide.read`) is OpenSlide's. The decoder is used only after it decoded a few tiles spread over
the slide to exactly OpenSlide's pixels; it relies on tifffile page internals (`decode`,
`dataoffsets`), hence the upper bounds on tifffile and imagecodecs in pyproject.toml.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from histocsc.errors import SlideError
from histocsc.wsi.backend_openslide import OpenSlideSlide

TILE_CACHE_BYTES = 512 * 2**20  # at most this much of decoded TIFF tiles kept per reader
PROBE_TILES = 3  # tiles decoded and compared with OpenSlide before the decoder is trusted


class TiffTileSlide(OpenSlideSlide):
    """An OpenSlide slide whose level-0 tile runs are decoded directly (RGB)."""

    backend = "tiff"
    FORMATS: ClassVar[set[str]] = {"aperio", "generic-tiff"}
    raw_conversion: ClassVar[int | None] = None

    def _open(self) -> None:
        super()._open()
        self._level0: TiffLevel0 | None = None
        self._rgb = np.empty(0, np.uint8)
        width, height = self.level_dimensions[0]
        try:
            self._level0 = TiffLevel0(self.path, width, height, self.background)
            self._level0.check_against(self.osr)
        except BaseException:
            self.close()
            raise

    def read_level0_raw(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a level-0 region, in a buffer reused by the next call."""
        assert self._level0 is not None
        if self._rgb.size < w * h * 3:
            self._rgb = np.empty(w * h * 3, np.uint8)
        out = self._rgb[: w * h * 3].reshape(h, w, 3)
        try:
            return self._level0.read(x, y, w, h, out)
        except Exception as exc:  # noqa: BLE001 - a corrupt tile is the user's file problem
            msg = f"{self.path}: cannot decode pixels at x={x} y={y} ({exc})"
            raise SlideError(msg) from None

    def close(self) -> None:
        if getattr(self, "_level0", None) is not None:
            self._level0.close()
            self._level0 = None
        super().close()


class TiffLevel0:
    """Level 0 of a tiled TIFF, tiles decoded directly into RGB with a cache of decoded tiles
    holding the rows of the slide that a run of tiles spans."""

    def __init__(
        self, path: Path, width: int, height: int, background: tuple[int, int, int]
    ) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        page = self._tif.pages[0]
        ok = (
            page.is_tiled
            and page.shape[:2] == (height, width)
            and page.ndim == 3
            and page.shape[2] == 3
            and page.dtype == np.uint8
            and page.planarconfig == 1
            and page.tiledepth == 1
        )
        if not ok:
            self._tif.close()
            raise ValueError("level 0 is not a tiled 8-bit RGB page")
        self._page, self._decode = page, page.decode
        self._fd = self._tif.filehandle.fileno()
        self.width, self.height = width, height
        self.tw, self.th = page.tilewidth, page.tilelength
        self.cols = -(-width // self.tw)
        self._background = np.array(background, np.uint8)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._capacity = 2 * self.cols + 8  # grown in `read` to hold the rows a run spans
        self._max_capacity = max(64, TILE_CACHE_BYTES // (self.tw * self.th * 3))

    def _tile(self, index: int) -> np.ndarray:
        tile = self._cache.get(index)
        if tile is not None:
            self._cache.move_to_end(index)
            return tile
        count = self._page.databytecounts[index]
        if count == 0:  # a tile the scanner never wrote: the background, as OpenSlide shows it
            tile = np.empty((self.th, self.tw, 3), np.uint8)
            tile[:] = self._background
        else:
            data = os.pread(self._fd, count, self._page.dataoffsets[index])
            tile = self._decode(data, index, jpegtables=self._page.jpegtables)[0]
            tile = tile.reshape(self.th, self.tw, 3)
        self._cache[index] = tile
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return tile

    def check_against(self, osr: object) -> None:
        """Decode the first, middle and last stored tiles and compare them with OpenSlide's
        pixels there; a ValueError names the first that differs (or cannot be decoded)."""
        counts = self._page.databytecounts
        stored = [i for i in range(len(counts)) if counts[i] > 0]
        if not stored:
            return
        picks = sorted({stored[round(k * (len(stored) - 1) / max(1, PROBE_TILES - 1))]
                        for k in range(PROBE_TILES)})
        for index in picks:
            ty, tx = divmod(index, self.cols)
            x, y = tx * self.tw, ty * self.th
            w, h = min(self.tw, self.width - x), min(self.th, self.height - y)
            mine = self.read(x, y, w, h, np.empty((h, w, 3), np.uint8))
            theirs = np.asarray(osr.read_region((x, y), 0, (w, h)))  # type: ignore[attr-defined]
            opaque = theirs[..., 3] == 255
            if not np.array_equal(mine[opaque], theirs[..., :3][opaque]):
                diff = np.abs(mine[opaque].astype(int) - theirs[..., :3][opaque]).max()
                raise ValueError(f"tile {index} decodes differently from OpenSlide (by {diff})")
        self._cache.clear()

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray) -> np.ndarray:
        """RGB pixels of the level-0 region (x, y, w, h), written into `out` (h, w, 3)."""
        tw, th = self.tw, self.th
        rows = (h + th - 1) // th + 1  # tile rows one run can touch, the last shared with the next
        self._capacity = min(self._max_capacity, max(self._capacity, rows * self.cols + 8))
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._tile(ty * self.cols + tx)
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                ]
        return out

    def close(self) -> None:
        self._tif.close()
