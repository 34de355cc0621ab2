"""Open any whole-slide image or plain image and read it at an mpp.

`Slide` is the small abstract slide every stage uses: a context manager whose coordinates are
level-0 pixels and whose resolution is asked for in microns per pixel. There is one subclass per
backend, and `open_slide` is the one factory that picks it (and logs which, and why it fell back):

- `OpenSlideSlide` (`backend_openslide`): every format OpenSlide reads;
- `TiffTileSlide` (`backend_tiff`): an Aperio SVS or generic tiled TIFF read by OpenSlide, whose
  level-0 tiles are decoded directly for fast runs of tiles (asked for with `fast_tiles`);
- `ImageSlide` (`backend_image`): a plain image (PNG, JPEG, flat TIFF), decoded once into memory
  and shared by every handle open on the same file.
"""

from __future__ import annotations

import abc
import functools
import logging
import math
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

import cv2
import numpy as np
import openslide

from histocsc.errors import SlideError, SlideNotFoundError

PROP_MPP_X = openslide.PROPERTY_NAME_MPP_X
PROP_MPP_Y = openslide.PROPERTY_NAME_MPP_Y
PROP_OBJECTIVE = openslide.PROPERTY_NAME_OBJECTIVE_POWER
PROP_VENDOR = openslide.PROPERTY_NAME_VENDOR
PROP_BACKGROUND = openslide.PROPERTY_NAME_BACKGROUND_COLOR
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
CHUNK_PX = 4096  # reads larger than this (per side, at the read level) are done in blocks
MPP_HINT = (
    "pass the pixel size with --slide-mpp (microns per pixel at full resolution, e.g. 0.5 for 20x)"
)
WHITE = (255, 255, 255)
H = TypeVar("H")
log = logging.getLogger(__name__)


class Slide(abc.ABC):
    """A slide opened for reading. Coordinates are level-0 pixels; resolution is an mpp.

    A subclass opens its file in `_open` (setting `properties`, `level_dimensions`,
    `level_downsamples` and `vendor`), reads pixels in `_read_level` and frees them in `close`.
    """

    backend: ClassVar[str] = ""
    # cv2 colour code that turns `read_level0_raw` pixels into RGB; None when they are RGB
    raw_conversion: ClassVar[int | None] = None

    def __init__(
        self, path: str | Path, mpp: float | None = None, fallback_mpp: float | None = None
    ) -> None:
        self.path = Path(path)
        check_slide_file(self.path)
        for value in (mpp, fallback_mpp):
            if value is not None and not (value > 0 and math.isfinite(value)):
                msg = f"{self.path}: mpp (pixel size) must be a positive number, got {value}"
                raise SlideError(msg)
        self.properties: dict[str, str] = {}
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.vendor = ""
        self._open()
        self.dimensions: tuple[int, int] = tuple(self.level_dimensions[0])  # type: ignore[assignment]
        recorded = None if mpp is not None else self._mpp_from_file()
        self._mpp = mpp if mpp is not None else (recorded or fallback_mpp)
        # where the pixel size came from: "given" (mpp), "file", "fallback" (fallback_mpp), None
        self.mpp_source: str | None = (
            "given" if mpp is not None else "file" if recorded else
            "fallback" if fallback_mpp is not None else None)

    # -- what a backend provides ----------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> None:
        """Open the file; set properties, level_dimensions, level_downsamples and vendor."""

    @abc.abstractmethod
    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """RGB uint8 of the level-0 region (x, y, w, h) at pyramid `level` (a new array)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file and the pixels."""

    def _opened(self, handle: H | None) -> H:
        """`handle` (the backend's open file or pixels); a SlideError once the slide is closed."""
        if handle is None:
            raise SlideError(f"{self.path}: the slide is closed")
        return handle

    def read_level0_raw(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels of (x, y, w, h) as the backend holds them (`raw_conversion` makes them
        RGB), for the tile reader. The array may be reused by the next call: copy what you keep.
        """
        return self._read_level(x, y, w, h, 0)

    # -- metadata -------------------------------------------------------------------------------
    @functools.cached_property
    def background(self) -> tuple[int, int, int]:
        """RGB that transparent and unscanned areas are shown as (`openslide.background-color`)."""
        return background_color(self.properties)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Microns per pixel at level 0; a SlideError if neither the file nor the user gives it."""
        if self._mpp is None:
            raise SlideError(f"{self.path}: the slide does not record its pixel size; {MPP_HINT}")
        return self._mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get(PROP_OBJECTIVE)
        try:
            return float(value) if value else None
        except ValueError:
            return None

    def _mpp_from_file(self) -> float | None:
        props = self.properties
        try:
            if PROP_MPP_X in props and PROP_MPP_Y in props:
                mpp = (float(props[PROP_MPP_X]) + float(props[PROP_MPP_Y])) / 2
                return mpp if mpp > 0 else None
            unit = props.get("tiff.ResolutionUnit", "").lower()
            xres = float(props.get("tiff.XResolution", 0))
        except ValueError:
            return None
        scale = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        if scale and xres > 0:
            mpp = scale / xres
            if 0.05 <= mpp <= 100:  # plausible for microscopy; rejects 72-dpi defaults
                return mpp
        return None

    # -- reading --------------------------------------------------------------------------------
    def read(
        self,
        x: int,
        y: int,
        w: int,
        h: int,
        mpp: float | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Read level-0 region (x, y, w, h) as RGB uint8 at `mpp` (default: level 0).

        The output is round(w * slide_mpp / mpp) wide unless `out_size` = (W, H) is given.
        """
        x, y, w, h = int(x), int(y), int(w), int(h)
        width, height = self.dimensions
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise SlideError(
                f"{self.path}: region x={x} y={y} w={w} h={h} lies outside the slide "
                f"({width} x {height} px at level 0)"
            )
        downsample = 1.0 if mpp is None else mpp / self.mpp
        if downsample <= 0:
            raise SlideError(f"{self.path}: requested mpp must be positive, got {mpp}")
        if out_size is None:
            out_size = (max(1, round(w / downsample)), max(1, round(h / downsample)))
        out_w, out_h = out_size
        level = self.best_level(min(w / out_w, h / out_h))
        level_ds = self.level_downsamples[level]
        if w / level_ds > CHUNK_PX * 1.5 or h / level_ds > CHUNK_PX * 1.5:
            return self._read_in_blocks(x, y, w, h, out_w, out_h)
        region = self._read_level(x, y, w, h, level)
        if region.shape[1] != out_w or region.shape[0] != out_h:
            region = cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return region

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide as RGB uint8 at `mpp`."""
        width, height = self.dimensions
        return self.read(0, 0, width, height, mpp)

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is still at most `downsample` (as fine as asked)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * 1.01:  # 1 % slack for rounded output sizes
                best = level
        return best

    def _level_size(self, w: int, h: int, level: int) -> tuple[int, int]:
        """Size at `level` of a level-0 extent w x h."""
        level_ds = self.level_downsamples[level]
        return max(1, math.ceil(w / level_ds)), max(1, math.ceil(h / level_ds))

    def _read_in_blocks(self, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> np.ndarray:
        out = np.empty((out_h, out_w, 3), np.uint8)
        sx, sy = w / out_w, h / out_h
        level = self.best_level(min(sx, sy))
        # output px per block, so that one block is at most CHUNK_PX px at the level read
        step = max(1, int(CHUNK_PX * self.level_downsamples[level] / max(sx, sy)))
        for oy in range(0, out_h, step):
            for ox in range(0, out_w, step):
                ow, oh = min(step, out_w - ox), min(step, out_h - oy)
                x0, y0 = x + round(ox * sx), y + round(oy * sy)
                x1 = min(x + w, x + round((ox + ow) * sx))
                y1 = min(y + h, y + round((oy + oh) * sy))
                block = self._read_level(x0, y0, max(1, x1 - x0), max(1, y1 - y0), level)
                if block.shape[:2] != (oh, ow):
                    block = cv2.resize(block, (ow, oh), interpolation=cv2.INTER_AREA)
                out[oy : oy + oh, ox : ox + ow] = block
        return out

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self._mpp:.3f}" if self._mpp else "unknown"
        size = f"{self.dimensions[0]}x{self.dimensions[1]}"
        return f"{type(self).__name__}({str(self.path)!r}, {size}, mpp={mpp})"


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    fallback_mpp: float | None = None,
    fast_tiles: bool = False,
) -> Slide:
    """Open a whole-slide image or a plain image; `mpp` overrides the file's pixel size,
    `fallback_mpp` is used only when the file records none.

    With `fast_tiles` (for reading many tiles), an Aperio SVS or generic tiled TIFF gets the
    direct tile decoder when it reads this file exactly as OpenSlide does, else OpenSlide with a
    large tile cache. The choice, and the reason for any fallback, is logged.
    """
    from histocsc.wsi.backend_image import ImageSlide
    from histocsc.wsi.backend_openslide import OpenSlideSlide
    from histocsc.wsi.backend_tiff import TiffTileSlide

    path = Path(path)
    check_slide_file(path)
    fmt = detect_format(path)
    if fmt is None:
        log.info("%s: image backend (not a format OpenSlide reads)", path)
        return ImageSlide(path, mpp=mpp, fallback_mpp=fallback_mpp)
    if fast_tiles and fmt in TiffTileSlide.FORMATS:
        try:
            slide: Slide = TiffTileSlide(path, mpp=mpp, fallback_mpp=fallback_mpp)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - any surprise in the fast path: OpenSlide reads it
            log.info("%s: OpenSlide backend; direct TIFF tiles unusable (%s)", path, exc)
        else:
            log.info("%s: direct TIFF tile backend (%s)", path, fmt)
            return slide
    log.info("%s: OpenSlide backend (%s)", path, fmt)
    return OpenSlideSlide(path, mpp=mpp, fallback_mpp=fallback_mpp, big_cache=fast_tiles)


def check_slide_file(path: Path) -> None:
    """A SlideError (SlideNotFoundError when missing) unless `path` is a non-empty file."""
    if not path.exists():
        raise SlideNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty")


def detect_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format (aperio, generic-tiff, ...), or None."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def background_color(properties: dict[str, str]) -> tuple[int, int, int]:
    """The slide's `openslide.background-color` (hex RRGGBB) as RGB; white when absent."""
    value = properties.get(PROP_BACKGROUND, "")
    try:
        rgb = int(value, 16)
    except ValueError:
        return WHITE
    if len(value) != 6:
        return WHITE
    return (rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255


def composite(rgba: np.ndarray, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """RGBA (not premultiplied) to RGB over `background`."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)  # fast 4->3 copy
    a = alpha[..., None].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    out = rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
