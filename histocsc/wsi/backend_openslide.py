"""The OpenSlide backend: every format OpenSlide reads (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import openslide
import openslide.lowlevel

from histocsc.errors import SlideError
from histocsc.wsi.slide import PROP_VENDOR, Slide, composite, detect_format

BIG_CACHE_BYTES = 256 * 2**20  # tile cache for tile runs: two rows of JPEG tiles of a big slide


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide. `read_level0_raw` gives BGRA (OpenSlide's own word
    order, composited on the background colour) straight from OpenSlide, skipping PIL."""

    backend = "openslide"
    raw_conversion: ClassVar[int | None] = cv2.COLOR_BGRA2RGB

    def __init__(
        self,
        path: str | Path,
        mpp: float | None = None,
        fallback_mpp: float | None = None,
        big_cache: bool = False,
    ) -> None:
        self._big_cache = big_cache  # for tile runs: a tile cache that holds two rows of tiles
        self._buf = np.empty(0, np.uint32)
        super().__init__(path, mpp=mpp, fallback_mpp=fallback_mpp)

    def _open(self) -> None:
        fmt = detect_format(self.path) or "slide"
        try:
            self._osr: openslide.OpenSlide | None = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            msg = f"{self.path}: OpenSlide cannot open this {fmt} file ({exc})"
            raise SlideError(msg) from None
        if self._big_cache:
            self._osr.set_cache(openslide.OpenSlideCache(BIG_CACHE_BYTES))
        self.properties = dict(self._osr.properties)
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.vendor = self.properties.get(PROP_VENDOR, fmt)

    @property
    def osr(self) -> openslide.OpenSlide:
        """The OpenSlide handle."""
        return self._opened(self._osr)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        try:
            rgba = np.asarray(self.osr.read_region((x, y), level, self._level_size(w, h, level)))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{self.path}: cannot read pixels at x={x} y={y} ({exc})") from None
        return composite(rgba, self.background)

    def read_level0_raw(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """BGRA uint8 (h, w, 4) of a level-0 region, transparent areas on the background."""
        if self._buf.size < w * h:
            self._buf = np.empty(w * h, np.uint32)
        buf = self._buf[: w * h]
        try:
            _read_region_into(self.osr, buf, x, y, w, h)
        except (openslide.OpenSlideError, OSError) as exc:
            msg = f"{self.path}: cannot read pixels at x={x} y={y} ({exc})"
            raise SlideError(msg) from None
        bgra = buf.view(np.uint8).reshape(h, w, 4)  # premultiplied ARGB words, little-endian
        alpha = cv2.extractChannel(bgra, 3)
        if alpha.min() < 255:  # over the background: premultiplied colour + bg * (1 - alpha)
            if self.background == (255, 255, 255):
                bgra[..., :3] += (255 - alpha)[..., None]
            else:
                bg = np.array(self.background[::-1], np.uint16)  # B, G, R
                fill = (bg * (255 - alpha[..., None].astype(np.uint16)) + 127) // 255
                bgra[..., :3] += fill.astype(np.uint8)
        return bgra

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None


def _read_region_into(osr: openslide.OpenSlide, buf: np.ndarray, x: int, y: int, w: int, h: int):
    """OpenSlide's level-0 read straight into `buf` (uint32 premultiplied ARGB, w*h), skipping
    the PIL image; falls back to the public API if openslide-python's internals change."""
    try:
        llread, handle = openslide.lowlevel._read_region, osr._osr  # noqa: SLF001
    except AttributeError:
        rgba = np.asarray(osr.read_region((x, y), 0, (w, h)))
        bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
        alpha = bgra[..., 3:].astype(np.uint16)  # back to premultiplied, as OpenSlide gives
        bgra[..., :3] = (bgra[..., :3] * alpha + 127) // 255
        buf.view(np.uint8).reshape(h, w, 4)[:] = bgra
        return
    llread(handle, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, 0, w, h)
