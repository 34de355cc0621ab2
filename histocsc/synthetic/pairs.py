"""Real-texture registration pairs with exact landmarks, cut from real H&E images.

A pair is two square crops of one real H&E image: the fixed crop as is, the moving crop
resampled through a known map (rotation up to 180°, mirroring, a few % of scale, a smooth
elastic warp, 50-95 % overlap with the fixed crop), re-coloured as an IHC (hematoxylin + DAB
through HED space, `skimage.color`), blurred and unevenly lit. Crops are placed where tissue
fills the frame. Landmarks are exact: a grid of moving pixels and the fixed pixels they came
from (continuous level-0 px, pixel centres at i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.color import hed2rgb, rgb2hed

from histocsc.ihc.deconvolution import tissue_mask_od
from histocsc.wsi.slide import open_slide

GRID_PX = 16  # landmark spacing (moving px)
MIN_TISSUE = 0.85  # both crops: at least this fraction of tissue
WARP_WAVELENGTH_UM = (1500.0, 4000.0)  # elastic warp wavelengths (synthetic.transform's range)


@dataclass
class Pair:
    """Fixed (H&E) and moving (IHC-like) crops, landmarks (N, 2) each, and how it was made."""

    fixed: np.ndarray
    moving: np.ndarray
    fixed_points: np.ndarray
    moving_points: np.ndarray
    mpp: float
    meta: dict[str, Any] = field(default_factory=dict)


def make_pair(
    source: np.ndarray, mpp: float, rng: np.random.Generator, size: int = 384, **fixed: Any
) -> Pair:
    """A random pair from `source` (RGB uint8 at `mpp`); keyword arguments fix parameters."""
    p = {
        "rotation_deg": float(rng.uniform(-180, 180)),
        "mirror": bool(rng.random() < 0.5),
        "scale": float(rng.uniform(0.97, 1.03)),
        "overlap": float(rng.uniform(0.5, 0.95)),
        "elastic_px": float(rng.uniform(0, 0.012 * size)),  # amplitude
        "ihc": bool(rng.random() < 0.85),
        "blur_px": float(rng.uniform(0, 1.5)),
        "light": float(rng.uniform(0, 0.15)),
    }
    p.update(fixed)
    h, w = source.shape[:2]
    tissue = tissue_mask_od(source, 0.15)
    for _ in range(200):
        o_f = np.array([rng.uniform(0, w - size), rng.uniform(0, h - size)])
        smap = _source_map(rng, p, size, o_f, mpp)
        if smap is None or not _inside(smap, w, h):
            continue
        fx, fy = int(o_f[0]), int(o_f[1])
        moving_tissue = cv2.remap(tissue.astype(np.float32), smap[0], smap[1], cv2.INTER_NEAREST)
        if tissue[fy : fy + size, fx : fx + size].mean() >= MIN_TISSUE and (
            moving_tissue.mean() >= MIN_TISSUE
        ):
            break
    else:
        raise ValueError("no crop position with tissue filling both frames")
    o_f = np.array([fx, fy], float)
    fixed_rgb = np.ascontiguousarray(source[fy : fy + size, fx : fx + size])
    moving = cv2.remap(source, smap[0], smap[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    moving = _restyle(moving, p, rng)
    # landmarks: moving grid px q -> source s(q) -> fixed px s - o_f
    q = np.stack(np.meshgrid(np.arange(8, size, GRID_PX), np.arange(8, size, GRID_PX)), -1)
    q = q.reshape(-1, 2)
    s = np.column_stack([smap[0][q[:, 1], q[:, 0]], smap[1][q[:, 1], q[:, 0]]])
    f = s - o_f
    keep = (f >= 0).all(1) & (f <= size - 1).all(1)
    p["overlap_measured"] = round(float(keep.mean()), 3)
    return Pair(fixed_rgb, moving, f[keep] + 0.5, q[keep] + 0.5, mpp, p)


def _source_map(rng: np.random.Generator, p: dict, size: int, o_f: np.ndarray, mpp: float):
    """(map_x, map_y): moving px -> source px, or None."""
    th = math.radians(p["rotation_deg"])
    lin = p["scale"] * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    if p["mirror"]:
        lin = lin @ np.diag([-1.0, 1.0])
    a = 1 - math.sqrt(p["overlap"])  # offset of the crop centres, fraction of the side
    offset = size * a * np.sign(rng.uniform(-1, 1, 2))
    c = (size - 1) / 2
    centre_s = o_f + c + offset
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float64)
    dq = np.stack([gx - c, gy - c], -1)
    s = centre_s + dq @ lin.T
    amp = p["elastic_px"]
    if amp > 0:  # wavelengths of serial-section warps, as the phantom generator draws them
        for k in range(2):
            fx, fy = 2 * math.pi / (rng.uniform(*WARP_WAVELENGTH_UM, 2) / mpp)
            ph = rng.uniform(0, 2 * math.pi, 2)
            s[..., k] += amp * np.sin(fx * gx + ph[0]) * np.cos(fy * gy + ph[1])
    return s[..., 0].astype(np.float32), s[..., 1].astype(np.float32)


def _inside(smap, w: int, h: int) -> bool:
    return bool(
        smap[0].min() >= 0 and smap[1].min() >= 0 and smap[0].max() <= w - 1
        and smap[1].max() <= h - 1
    )


def _restyle(rgb: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """IHC recolouring through HED, blur and uneven light."""
    out = rgb.astype(np.float32) / 255
    if p["ihc"]:
        hed = rgb2hed(rgb)
        patches = cv2.GaussianBlur(rng.random(rgb.shape[:2]).astype(np.float32), (0, 0), 12)
        dab = hed[..., 1] * rng.uniform(0.3, 0.9) * (patches > np.median(patches))
        new = np.stack([hed[..., 0] * rng.uniform(0.5, 0.9), np.zeros_like(dab), dab], -1)
        out = np.clip(hed2rgb(new), 0, 1).astype(np.float32)
    if p["blur_px"] > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), p["blur_px"])
    if p["light"] > 0:
        h, w = out.shape[:2]
        ramp = np.linspace(-1, 1, w)[None, :] * np.ones((h, 1))
        out = out * (1 - p["light"] * (ramp + 1) / 2)[..., None] + p["light"] / 3
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def identity_error(pair: Pair) -> float:
    """Median landmark distance (px) with no registration."""
    return float(np.median(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1)))


def median_tre(transform: Any, fixed_points: np.ndarray, moving_points: np.ndarray) -> float:
    """Median target registration error (px of the moving image) of `transform` on landmarks."""
    mapped = transform.to_moving(fixed_points)
    return float(np.median(np.linalg.norm(mapped - moving_points, axis=1)))


def affine_fit_residual(fixed_points: np.ndarray, moving_points: np.ndarray) -> float:
    """Median residual of the least-squares affine fitted to the landmarks themselves."""
    a = np.c_[fixed_points, np.ones(len(fixed_points))]
    x, *_ = np.linalg.lstsq(a, moving_points, rcond=None)
    return float(np.median(np.linalg.norm(a @ x - moving_points, axis=1)))


def real_sources(real_dir: Path) -> dict[str, tuple[np.ndarray, float]]:
    """Real H&E images to cut pairs from: name -> (RGB, µm/px), from the shared real data.

    The TCGA frozen section records no pixel size: 0.5 µm/px (20x) is assumed.
    """
    svs, reg = real_dir / "svs", real_dir / "registration"
    out = {}
    with open_slide(svs / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as s:
        out["tcga"] = (s.thumbnail(2.0), 2.0)
    with open_slide(svs / "cmu-1-small-region.svs") as s:
        out["cmu1"] = (s.thumbnail(1.0), 1.0)
    for name, file in (("kidney", "Rat-Kidney_HE.jpg"), ("lung", "Izd2-29-041-w35_HE.jpg")):
        with open_slide(reg / file, mpp=5.0) as s:
            out[name] = (s.thumbnail(5.0), 5.0)
    return out
