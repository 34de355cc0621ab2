"""Tiles for export checks: parity, calibration of int8 variants and the variant gate, from an
array, a `tiles.npy` or a folder of images, or a fixed synthetic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histocsc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def load_tiles(source: str | Path | np.ndarray, tile_px: int, limit: int = 256) -> np.ndarray:
    """Tiles (N, tile_px, tile_px, 3) uint8 from an array, a `tiles.npy` or a folder of images.

    Images larger than a tile give their centre crop; smaller ones are resized up.
    """
    if isinstance(source, np.ndarray):
        arr = source
    else:
        path = Path(source)
        if path.is_file() and path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            npys = sorted(path.rglob("tiles.npy"))
            if files:
                arr = np.stack([_image_tile(p, tile_px) for p in _sample_list(files, limit)])
            elif npys:
                arr = np.concatenate([_fit_all(sample(np.load(p, mmap_mode="r"), limit),
                                               tile_px, p) for p in npys])
            else:
                raise DataError(f"{path}: no images (.png/.jpg/.tif) or tiles.npy found")
        else:
            raise DataError(f"{path}: calibration/check tiles must be a folder or a .npy file")
    return np.ascontiguousarray(_fit_all(sample(arr, limit), tile_px, source))


def _fit_all(arr: np.ndarray, tile_px: int, source: object) -> np.ndarray:
    """Check uint8 (N, H, W, 3) and bring every tile to tile_px."""
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        where = "" if isinstance(source, np.ndarray) else f"{source}: "
        raise DataError(f"{where}tiles must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (tile_px, tile_px):
        arr = np.stack([_fit(t, tile_px) for t in arr])
    return arr


def _sample_list(items: list[Path], limit: int) -> list[Path]:
    """At most `limit` items spread evenly over the list."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def sample(arr: np.ndarray, limit: int) -> np.ndarray:
    if len(arr) <= limit:
        return np.asarray(arr)
    idx = np.linspace(0, len(arr) - 1, limit).round().astype(int)
    return np.asarray(arr[idx])


def _image_tile(path: Path, tile_px: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return _fit(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), tile_px)


def _fit(img: np.ndarray, tile_px: int) -> np.ndarray:
    """Centre crop to a square tile, resizing only when the image is smaller than a tile."""
    import cv2

    h, w = img.shape[:2]
    if min(h, w) < tile_px:
        scale = tile_px / min(h, w)
        img = cv2.resize(img, (max(tile_px, round(w * scale)), max(tile_px, round(h * scale))),
                         interpolation=cv2.INTER_LINEAR)
        h, w = img.shape[:2]
    y0, x0 = (h - tile_px) // 2, (w - tile_px) // 2
    return np.ascontiguousarray(img[y0:y0 + tile_px, x0:x0 + tile_px, :3])


def synthetic_check_tiles(tile_px: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """A fixed batch of textured tiles, used for parity when no real tiles are given."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, tile_px // 8 + 1, tile_px // 8 + 1, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :tile_px, :tile_px]
    noise = rng.integers(-20, 21, size=smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)
