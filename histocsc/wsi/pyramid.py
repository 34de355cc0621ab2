"""Write pyramidal tiled JPEG TIFFs that OpenSlide opens, with the pixel size recorded."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from histocsc.io import atomic_path

LEVEL_FACTOR = 4  # each pyramid level is 4x smaller than the one above, as Aperio slides are
ReadTile = Callable[[int, int, int, int], np.ndarray]


def write_pyramid_tiff(
    path: str | Path,
    height: int,
    width: int,
    read_tile: ReadTile,
    mpp: float,
    tile: int = 256,
    quality: int = 90,
    min_size: int = 512,
    description: str = "",
) -> Path:
    """Write a slide of `height` x `width` px at `mpp`, asking `read_tile(y, x, h, w)` per tile.

    Level 0 is written tile by tile; lower levels come from a 4x-downsampled copy held in memory
    (1/16 of the slide), so a 40000 x 40000 slide never sits whole in memory.
    """
    if tile % 16:
        raise ValueError("tile must be a multiple of 16")
    path = Path(path)
    small = np.full(
        (math.ceil(height / LEVEL_FACTOR), math.ceil(width / LEVEL_FACTOR), 3), 255, np.uint8
    )

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                h, w = min(tile, height - y), min(tile, width - x)
                block = np.asarray(read_tile(y, x, h, w), dtype=np.uint8)
                if block.shape != (h, w, 3):
                    raise ValueError(f"read_tile returned {block.shape}, expected {(h, w, 3)}")
                sh, sw = math.ceil(h / LEVEL_FACTOR), math.ceil(w / LEVEL_FACTOR)
                small[
                    y // LEVEL_FACTOR : y // LEVEL_FACTOR + sh,
                    x // LEVEL_FACTOR : x // LEVEL_FACTOR + sw,
                ] = cv2.resize(block, (sw, sh), interpolation=cv2.INTER_AREA)
                if (h, w) != (tile, tile):
                    padded = np.full((tile, tile, 3), 255, np.uint8)
                    padded[:h, :w] = block
                    block = padded
                yield block

    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(height, width)) as tif,
    ):
        _write_level(tif, tiles(), (height, width), mpp, tile, quality, 0, description)
        level_mpp = mpp * LEVEL_FACTOR
        level = small
        while max(level.shape[:2]) >= min_size and min(level.shape[:2]) >= tile // 4:
            _write_level(tif, level, level.shape[:2], level_mpp, tile, quality, 1, "")
            level_mpp *= LEVEL_FACTOR
            level = _downsample(level)
    return path


def write_pyramid_tiff_from_array(
    path: str | Path, rgb: np.ndarray, mpp: float, **options: Any
) -> Path:
    """Write an RGB uint8 array already in memory as a pyramidal tiled TIFF; `options` (tile,
    quality, min_size, description) as for `write_pyramid_tiff`."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {rgb.shape}")
    height, width = rgb.shape[:2]
    return write_pyramid_tiff(
        path, height, width, lambda y, x, h, w: rgb[y : y + h, x : x + w], mpp, **options
    )


def _write_level(
    tif: tifffile.TiffWriter,
    data: np.ndarray | Iterator[np.ndarray],
    shape: tuple[int, int],
    mpp: float,
    tile: int,
    quality: int,
    subfiletype: int,
    description: str,
) -> None:
    res = 1e4 / mpp
    tif.write(
        data,
        shape=(shape[0], shape[1], 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        subfiletype=subfiletype,
        description=description or None,
        metadata=None,
        software=False,
        maxworkers=2,
    )


def _downsample(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, math.ceil(w / LEVEL_FACTOR)), max(1, math.ceil(h / LEVEL_FACTOR)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _needs_bigtiff(height: int, width: int) -> bool:
    return height * width * 3 > 2**31  # compressed it is smaller, but be safe past 2 GB raw
