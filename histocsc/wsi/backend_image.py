"""The in-memory image backend: a plain image (PNG, JPEG, BMP, flat TIFF) as a one-level slide.

The file is decoded once; every handle open on the same unchanged file (the reader threads of
`histocsc infer`, say) shares that one read-only copy, which is freed with the last handle.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from histocsc.errors import SlideError
from histocsc.wsi.slide import PLAIN_IMAGE_SUFFIXES, Slide, composite

TIFF_SUFFIXES = {".tif", ".tiff"}
_SHARED: weakref.WeakValueDictionary[tuple[str, int, int], np.ndarray] = (
    weakref.WeakValueDictionary()
)
_LOCK = threading.Lock()


class ImageSlide(Slide):
    """A plain image read whole into memory (RGB uint8)."""

    backend = "image"

    def _open(self) -> None:
        self._image: np.ndarray | None = shared_image(self.path)
        h, w = self._image.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.vendor = "image"
        if self.path.suffix.lower() in TIFF_SUFFIXES:
            self.properties = tiff_resolution(self.path)

    @property
    def image(self) -> np.ndarray:
        """The shared decoded pixels (read-only)."""
        return self._opened(self._image)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self.image[y : y + h, x : x + w].copy()

    def read_level0_raw(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A read-only view of the shared pixels (no copy)."""
        return self.image[y : y + h, x : x + w]

    def close(self) -> None:
        self._image = None


def shared_image(path: Path) -> np.ndarray:
    """The decoded pixels of `path`, shared (read-only) while any handle holds them."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _LOCK:  # one decode per file, even when several threads open it at once
        image = _SHARED.get(key)
        if image is None:
            image = read_plain_image(path)
            image.flags.writeable = False
            _SHARED[key] = image
    return image


def read_plain_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a plain image file; alpha is composited on white."""
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise SlideError(
            f"{path}: not a slide format OpenSlide can read "
            "(corrupt, truncated or unsupported file)"
        )
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
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
    return composite(arr) if arr.shape[2] == 4 else np.ascontiguousarray(arr)


def tiff_resolution(path: Path) -> dict[str, str]:
    """The TIFF resolution tags of a flat TIFF, as OpenSlide names them (empty when absent)."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            tags = tif.pages[0].tags
            unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "")
            num, den = tags["XResolution"].value
            xres = num / den if den else 0.0
    except Exception:  # noqa: BLE001 - missing tags mean no resolution
        return {}
    return {"tiff.ResolutionUnit": unit, "tiff.XResolution": repr(xres)}
