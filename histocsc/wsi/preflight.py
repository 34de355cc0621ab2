"""Checks of a tiling request before any pixel is read: the slide pixel size to use (and a
warning when an explicit override disagrees with the file), tiles larger than the slide,
heavy upsampling, and whether the disk can hold the tile pixels."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from histocsc.errors import SlideError
from histocsc.wsi.slide import Slide, open_slide

UPSAMPLE_WARN = 1.10  # warn when tiles are made more than 10 % finer than the slide's pixels
DISK_MARGIN = 1.05  # keep 5 % of slack over the estimated size of the tile store


def open_with_pixel_size(path: Path, slide_mpp: float | None,
                         override: float | None) -> tuple[Slide, str | None]:
    """Open `path` with its own pixel size, `slide_mpp` used only when it records none, or the
    explicit `override`; returns the slide and a warning when the override disagrees."""
    if override is None:
        return open_slide(path, fallback_mpp=slide_mpp), None
    slide = open_slide(path)
    recorded = slide.mpp if slide.has_mpp else None
    slide.close()
    note = None
    if recorded is not None and not math.isclose(recorded, override, rel_tol=0.01):
        note = (f"{path}: --override-slide-mpp {override:g} µm/px replaces the pixel size the "
                f"file records ({recorded:g} µm/px)")
    return open_slide(path, mpp=override), note


def check_tiling(slide: Slide, tile_px: int, mpp: float) -> list[str]:
    """SlideError when no tile fits in the slide; warnings for a heavy upsampling."""
    width, height = slide.dimensions
    side0 = tile_px * mpp / slide.mpp  # tile side in level-0 px
    if side0 > min(width, height):
        raise SlideError(
            f"{slide.path}: a tile of {tile_px} px at {mpp:g} µm/px ({tile_px * mpp:.0f} µm) is "
            f"larger than the slide ({width} x {height} px = {width * slide.mpp:.0f} x "
            f"{height * slide.mpp:.0f} µm): no tile fits; lower --tile-px or --mpp")
    warnings = []
    if slide.mpp / mpp > UPSAMPLE_WARN:
        warnings.append(
            f"{slide.path}: tiles at {mpp:g} µm/px are {slide.mpp / mpp:.1f}x finer than the "
            f"slide's own pixels ({slide.mpp:g} µm/px): they are upsampled and hold no more "
            "detail; check --mpp")
    return warnings


def check_disk(out_dir: Path, n_tiles: int, tile_px: int, source: Path) -> None:
    """SlideError when the disk under `out_dir` cannot hold `n_tiles` tile pixels."""
    need = n_tiles * tile_px * tile_px * 3
    probe = out_dir if out_dir.exists() else next(p for p in out_dir.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need * DISK_MARGIN > free:
        raise SlideError(
            f"{source}: the tile pixels ({n_tiles} tiles of {tile_px} px) need about "
            f"{need / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free; "
            "run without --save-images, or choose a coarser --mpp or a larger disk")


def effective_slide_mpp(
    path: Path, slide_mpp: float | None, override: float | None = None
) -> tuple[float | None, str | None]:
    """The pixel size a slide will be read with (None when neither the file nor the user gives
    one) and the override warning of `open_with_pixel_size`."""
    slide, note = open_with_pixel_size(path, slide_mpp, override)
    with slide:
        return (slide.mpp if slide.has_mpp else None), note
