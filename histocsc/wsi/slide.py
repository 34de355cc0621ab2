"""Open any whole-slide image (OpenSlide) or plain image (Pillow / tifffile) and read at an mpp."""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import openslide
from PIL import Image

from histocsc.errors import SlideError

PROP_MPP_X = openslide.PROPERTY_NAME_MPP_X
PROP_MPP_Y = openslide.PROPERTY_NAME_MPP_Y
PROP_OBJECTIVE = openslide.PROPERTY_NAME_OBJECTIVE_POWER
PROP_VENDOR = openslide.PROPERTY_NAME_VENDOR
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
CHUNK_PX = 4096  # reads larger than this (per side, at the read level) are done in blocks
MPP_HINT = (
    "pass the pixel size with --slide-mpp (microns per pixel at full resolution, e.g. 0.5 for 20x)"
)


class Slide:
    """A slide opened for reading. Coordinates are level-0 pixels; resolution is an mpp."""

    def __init__(
        self, path: str | Path, mpp: float | None = None, fallback_mpp: float | None = None
    ) -> None:
        self.path = Path(path)
        _check_file(self.path)
        for value in (mpp, fallback_mpp):
            if value is not None and not (value > 0 and math.isfinite(value)):
                msg = f"{self.path}: mpp (pixel size) must be a positive number, got {value}"
                raise SlideError(msg)
        self._osr: openslide.OpenSlide | None = None
        self._image: np.ndarray | None = None
        self.properties: dict[str, str] = {}
        fmt = _detect_openslide_format(self.path)
        if fmt is not None:
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError) as exc:
                msg = f"{self.path}: OpenSlide cannot open this {fmt} file ({exc})"
                raise SlideError(msg) from None
            self.properties = dict(self._osr.properties)
            self.level_dimensions = tuple(self._osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
            self.vendor = self.properties.get(PROP_VENDOR, fmt)
        else:
            self._image = _read_plain_image(self.path)
            h, w = self._image.shape[:2]
            self.level_dimensions = ((w, h),)
            self.level_downsamples = (1.0,)
            self.vendor = "image"
        self.dimensions: tuple[int, int] = tuple(self.level_dimensions[0])  # type: ignore[assignment]
        self._mpp = mpp if mpp is not None else (self._mpp_from_file() or fallback_mpp)

    # -- metadata -------------------------------------------------------------------------------
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
        if self._image is not None and self.path.suffix.lower() in {".tif", ".tiff"}:
            unit, xres = _tiff_resolution(self.path)
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
        level = self._best_level(min(w / out_w, h / out_h))
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

    def _best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is still at most `downsample` (as fine as asked)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * 1.01:  # 1 % slack for rounded output sizes
                best = level
        return best

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        level_ds = self.level_downsamples[level]
        lw, lh = max(1, math.ceil(w / level_ds)), max(1, math.ceil(h / level_ds))
        if self._image is not None:
            return self._image[y : y + h, x : x + w]
        assert self._osr is not None
        try:
            rgba = np.asarray(self._osr.read_region((x, y), level, (lw, lh)))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{self.path}: cannot read pixels at x={x} y={y} ({exc})") from None
        return _composite_on_white(rgba)

    def _read_in_blocks(self, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> np.ndarray:
        out = np.empty((out_h, out_w, 3), np.uint8)
        sx, sy = w / out_w, h / out_h
        level = self._best_level(min(sx, sy))
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
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._image = None

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
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={mpp})"


def open_slide(
    path: str | Path, mpp: float | None = None, fallback_mpp: float | None = None
) -> Slide:
    """Open a whole-slide image or a plain image; `mpp` overrides the file's pixel size,
    `fallback_mpp` is used only when the file records none."""
    return Slide(path, mpp=mpp, fallback_mpp=fallback_mpp)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty")


def _detect_openslide_format(path: Path) -> str | None:
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None
    return fmt


def _read_plain_image(path: Path) -> np.ndarray:
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise SlideError(
            f"{path}: not a slide format OpenSlide can read "
            "(corrupt, truncated or unsupported file)"
        )
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            arr = tifffile.imread(str(path))
        else:
            with Image.open(path) as img:
                img.load()
                has_alpha = img.mode in ("RGBA", "LA", "P")
                arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
        msg = f"{path}: cannot read the image ({exc.__class__.__name__}: {exc})"
        raise SlideError(msg) from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(f"{path}: expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise SlideError(f"{path}: expected 8-bit pixels, got {arr.dtype}")
    return _composite_on_white(arr) if arr.shape[2] == 4 else np.ascontiguousarray(arr)


def _tiff_resolution(path: Path) -> tuple[str, float]:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            tags = tif.pages[0].tags
            unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "")
            num, den = tags["XResolution"].value
            return unit, num / den if den else 0.0
    except Exception:  # noqa: BLE001 - missing tags mean no resolution
        return "", 0.0


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) to RGB on a white background."""
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.min() == 255:
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)  # fast 4->3 copy
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
