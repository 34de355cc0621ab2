"""The images registration works on, and the geometry helpers every step shares.

Each slide becomes one thumbnail at the working resolution with a shared stain channel (the
`feature`: hematoxylin optical density by default, H&E matrix for the fixed slide, H-DAB for
the moving one; zero under pen ink) and a tissue mask (total OD; pen ink, specks and bubble
outlines removed). Warps are OpenCV 2x3 matrices mapping fixed pixels to moving pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from histocsc.errors import RegistrationError
from histocsc.ihc.deconvolution import named_stains, optical_density, unmix
from histocsc.ihc.registration.config import RegistrationConfig
from histocsc.wsi.slide import Slide
from histocsc.wsi.tissue import ink_mask

MIN_OVERLAP = 0.25  # a pose leaving less of the fixed frame covered than this scores -1


@dataclass
class SectionImage:
    """A slide thumbnail with what registration needs; `level0` maps its px to level-0 px."""

    rgb: np.ndarray
    feature: np.ndarray
    mask: np.ndarray
    level0: np.ndarray  # 3x3: thumbnail px -> level-0 px (pixel centres)
    info: dict[str, Any]


def slide_thumb(slide: Slide, mpp: float) -> tuple[np.ndarray, dict[str, Any]]:
    """(RGB at `mpp`, slide info) of an open slide."""
    rgb = slide.thumbnail(mpp)
    w0, h0 = slide.dimensions
    return rgb, {"path": str(slide.path), "width": w0, "height": h0, "mpp": slide.mpp}


def array_thumb(rgb: np.ndarray, mpp: float, work_mpp: float, name: str) -> tuple:
    """(RGB at `work_mpp`, info) of an RGB array at `mpp`."""
    rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)
    h0, w0 = rgb.shape[:2]
    size = (max(1, round(w0 * mpp / work_mpp)), max(1, round(h0 * mpp / work_mpp)))
    if size != (w0, h0):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb, {"path": name, "width": w0, "height": h0, "mpp": mpp}


def prepare(
    rgb: np.ndarray, info: dict[str, Any], stains: str, cfg: RegistrationConfig, mpp: float
) -> SectionImage:
    """The shared stain channel (scaled to ~1 on dense tissue) and tissue mask of a thumbnail."""
    if rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise RegistrationError(
            f"{info['path']}: too small at {mpp:g} µm/px ({rgb.shape[1]}x{rgb.shape[0]} px)"
        )
    od = optical_density(rgb)
    total = od.sum(axis=2)
    if cfg.ink:
        ink = cv2.dilate(ink_mask(rgb, cfg.ink).astype(np.uint8), np.ones((5, 5), np.uint8))
        total[ink > 0] = 0
        od[ink > 0] = 0
    mask = tissue(total, cfg.tissue_od, mpp)
    if mask.sum() < 50:
        raise RegistrationError(f"{info['path']}: no tissue found to register")
    if cfg.channel == "total_od":
        chan = total
    else:
        mat = named_stains(stains)
        amounts = np.maximum(unmix(od, mat), 0)
        chan = amounts[..., mat.index("hematoxylin")]
        if cfg.channel == "hematoxylin+dab" and "dab" in mat.names:
            chan = chan + amounts[..., mat.index("dab")]
    scale = float(np.percentile(chan[mask], 99)) or 1.0
    # not cut to the mask: pale IHC tissue (little hematoxylin, no DAB) falls outside it, and
    # holes of zeros would dominate the similarity; glass has ~no hematoxylin anyway
    feature = np.clip(chan / scale, 0, 1.5).astype(np.float32)
    sx, sy = info["width"] / rgb.shape[1], info["height"] / rgb.shape[0]
    # thumbnail pixel i covers [i * s, (i + 1) * s) of level 0: its centre is (i + 0.5) s
    level0 = np.array([[sx, 0, 0.5 * sx], [0, sy, 0.5 * sy], [0, 0, 1]])
    return SectionImage(rgb, feature, mask, level0, info)


def tissue(total_od: np.ndarray, ceiling: float, mpp: float) -> np.ndarray:
    """Tissue = blurred total OD above min(Otsu, `ceiling`), so pale IHC is not split by DAB.

    Specks, bubble outlines and pieces under 2 % of the largest piece are dropped.
    """
    blurred = cv2.GaussianBlur(total_od, (0, 0), max(2.0, 16.0 / mpp))
    top = max(float(np.percentile(blurred, 99.5)), 1e-3)
    u8 = np.clip(blurred / top * 255, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(0.04, min(otsu / 255 * top, ceiling))
    mask = (blurred > thr).astype(np.uint8)
    k_open = max(3, round(24.0 / mpp)) | 1
    k_close = max(5, round(40.0 / mpp)) | 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((k_open, k_open), np.uint8))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k_close, k_close), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate([[False], areas >= 0.02 * areas.max()])
    return keep[labels]


def flipped(img: SectionImage) -> SectionImage:
    """The image mirrored left-right; its level-0 matrix still points at the original pixels."""
    w = img.feature.shape[1]
    flip = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])
    return SectionImage(
        np.ascontiguousarray(img.rgb[:, ::-1]),
        np.ascontiguousarray(img.feature[:, ::-1]),
        np.ascontiguousarray(img.mask[:, ::-1]),
        img.level0 @ flip,
        img.info,
    )


# -- geometry ---------------------------------------------------------------------------------
def resize(img: np.ndarray, factor: float) -> np.ndarray:
    """`img` downsampled by `factor` (>= 1; area averaging)."""
    if factor <= 1:
        return img
    size = (max(8, round(img.shape[1] / factor)), max(8, round(img.shape[0] / factor)))
    return cv2.resize(img.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def rescale_warp(warp: np.ndarray, f_from: float, f_to: float) -> np.ndarray:
    """Warp between images downsampled by f_from -> the same warp at downsample f_to."""

    def px(f: float) -> np.ndarray:  # px at downsample f -> px at full work res
        return np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1]])

    full = np.vstack([warp, [0, 0, 1]])
    out = np.linalg.inv(px(f_to)) @ px(f_from) @ full @ np.linalg.inv(px(f_from)) @ px(f_to)
    return out[:2].astype(np.float32)


def warp_image(img: np.ndarray, warp: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The moving image resampled onto the fixed grid (`shape`), zero outside."""
    return cv2.warpAffine(
        img,
        warp.astype(np.float32),
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def full_map(warp: np.ndarray, flow: np.ndarray | None, shape: tuple[int, ...]):
    """Maps (map_x, map_y) fixed work px -> moving work px for cv2.remap."""
    h, w = shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    if flow is not None:
        gx = gx + flow[..., 0]
        gy = gy + flow[..., 1]
    mx = warp[0, 0] * gx + warp[0, 1] * gy + warp[0, 2]
    my = warp[1, 0] * gx + warp[1, 1] * gy + warp[1, 2]
    return mx.astype(np.float32), my.astype(np.float32)


def remap(img: np.ndarray, maps, border: float = 0) -> np.ndarray:
    """`img` sampled at `maps` (bilinear), `border` outside."""
    bv = border if img.ndim == 2 else (border,) * img.shape[2]
    return cv2.remap(
        img, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=bv
    )


def plausible(warp: np.ndarray, limit: float) -> bool:
    """A proper (not mirrored) affine whose scales stay within [1/limit, limit]."""
    sv = np.linalg.svd(warp[:, :2], compute_uv=False)
    return bool(sv.max() <= limit and sv.min() >= 1 / limit and np.linalg.det(warp[:, :2]) > 0)


# -- similarity -------------------------------------------------------------------------------
def ncc(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two images (over `weight` > 0); -1 if undefined."""
    if weight is not None:
        sel = weight > 0
        a, b = a[sel], b[sel]
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if a.size < 10:
        return -1.0
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else -1.0


def pose_score(fixed: np.ndarray, moving: np.ndarray, maps_or_warp, sigma: float = 1.0) -> float:
    """NCC of the blurred images where the moved frame covers the fixed one.

    The similarity every candidate pose is judged on (the images, not the masks). A pose
    covering less than MIN_OVERLAP of the fixed frame scores -1.
    """
    ones = np.ones(moving.shape, np.float32)
    if isinstance(maps_or_warp, tuple):
        moved, cover = remap(moving, maps_or_warp), remap(ones, maps_or_warp)
    else:
        moved = warp_image(moving, maps_or_warp, fixed.shape)
        cover = warp_image(ones, maps_or_warp, fixed.shape)
    valid = cover > 0.99
    if valid.mean() < MIN_OVERLAP:
        return -1.0
    a = cv2.GaussianBlur(fixed, (0, 0), sigma)
    b = cv2.GaussianBlur(moved, (0, 0), sigma)
    return ncc(a, b, valid)
