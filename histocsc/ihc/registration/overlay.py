"""overlay.png: checkerboard of the sections (left), colour blend (right), a banner if failed."""

from __future__ import annotations

import cv2
import numpy as np

from histocsc.ihc.registration.images import SectionImage, full_map, remap


def overlay(
    fixed: SectionImage,
    moving: SectionImage,
    warp: np.ndarray,
    flow: np.ndarray | None,
    max_px: int,
    banner: str = "",
) -> np.ndarray:
    """Checkerboard (left), blend (right: fixed magenta, moving green); red `banner` on top."""
    maps = full_map(warp, flow, fixed.feature.shape)
    moved_rgb = remap(moving.rgb, maps, border=255)
    h, w = fixed.feature.shape
    cell = max(8, min(h, w) // 8)
    yy, xx = np.mgrid[0:h, 0:w]
    checker = ((yy // cell + xx // cell) % 2 == 0)[..., None]
    board = np.where(checker, fixed.rgb, moved_rgb).astype(np.uint8)
    a = _display(fixed.feature, fixed.mask)
    b = _display(remap(moving.feature, maps), remap(moving.mask.astype(np.float32), maps) > 0.5)
    blend = np.dstack([255 - b, 255 - a, 255 - b])
    out = np.hstack([board, np.full((h, 4, 3), 255, np.uint8), blend])
    scale = min(1.0, max_px / max(out.shape[:2]))
    if scale < 1:
        size = (round(out.shape[1] * scale), round(out.shape[0] * scale))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
    if banner:
        out = _with_banner(out, banner)
    return out


def _with_banner(img: np.ndarray, text: str) -> np.ndarray:
    """`img` with a red band above it carrying `text` (white)."""
    band_h = max(24, img.shape[0] // 16)
    band = np.zeros((band_h, img.shape[1], 3), np.uint8)
    band[:] = (200, 0, 0)
    font_scale = band_h / 40
    cv2.putText(
        band, text[:120], (8, int(band_h * 0.7)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
        (255, 255, 255), max(1, band_h // 20), cv2.LINE_AA,
    )  # fmt: skip
    return np.vstack([band, img])


def _display(feature: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A feature stretched to 0-255 between its 5th and 98th percentiles over tissue."""
    values = feature[mask] if mask.any() else feature.ravel()
    lo, hi = np.percentile(values, [5, 98])
    out = np.clip((feature - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return out.astype(np.uint8)
