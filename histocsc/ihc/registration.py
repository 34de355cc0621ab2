"""Align an IHC section (moving) to its H&E serial section (fixed) at low resolution.

Steps, all on one thumbnail per slide read at the working resolution (`work_mpp`, finer for
small sections; never finer than the slides):

1. A representation both stains share: hematoxylin optical density (H&E matrix for the fixed
   slide, H-DAB for the moving one), zero outside a tissue mask (total OD; pen ink, specks and
   bubble outlines removed).
2. Initialisation at `coarse_mpp` from the tissue masks: centroids, principal axes and a sweep
   of angles, on the section as is and mirrored; the best by normalised cross-correlation (NCC)
   are refined by OpenCV ECC and the best kept.
3. Affine refinement by ECC, coarse to fine.
4. Optional smooth non-rigid refinement: OpenCV Farneback optical flow between the aligned
   images, smoothed by a tissue-weighted Gaussian (`smooth_um`).
5. Error estimate, independent of the fit: ECC translations in ~400 µm tissue blocks of the
   registered pair (median and 95th percentile, µm). A result above `poor_error_um` is `poor`.

Sections that do not match (NCC after the affine fit below `min_ncc`, an implausible scale, or
no converging start) raise RegistrationError naming both files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from histocsc.config import StrictModel
from histocsc.errors import RegistrationError
from histocsc.ihc.deconvolution import named_stains, optical_density, unmix
from histocsc.ihc.transform import Mapping, Transform, invert_mapping
from histocsc.io import atomic_path
from histocsc.wsi.slide import Slide, open_slide
from histocsc.wsi.tissue import ink_mask

ERROR_BLOCK_UM = 400.0  # block size of the error estimate
MAX_ERROR_BLOCKS = 600  # at most about this many block positions are tried
MIN_WORK_PX = 512  # small sections are registered at a finer resolution to keep this many px
MIN_COARSE_PX = 128  # ... and searched on at least this many
MAX_FAILED_BLOCKS = 0.7  # poor: the error estimate found no small shift in more blocks than this
MIN_TISSUE_OVERLAP = 0.5  # poor: registered tissue masks overlap (IoU) less than this


class RegistrationConfig(StrictModel):
    """Parameters of `register` (configs/register.yaml)."""

    work_mpp: float = Field(8.0, gt=0, description="resolution of the final fit (µm/px)")
    coarse_mpp: float = Field(32.0, gt=0, description="resolution of the initial search")
    channel: Literal["hematoxylin", "hematoxylin+dab", "total_od"] = "hematoxylin"
    fixed_stains: str = Field("H&E", description="stain matrix of the fixed slide")
    moving_stains: str = Field("H-DAB", description="stain matrix of the moving slide")
    tissue_od: float = Field(0.12, gt=0, description="total-OD tissue threshold (at most)")
    ink: list[Literal["green", "blue", "black"]] = Field(
        default_factory=lambda: ["green"], description="marker-pen colours ignored"
    )
    mirror: bool = Field(True, description="also try the mirrored moving section")
    angle_step: float = Field(10.0, gt=0, le=90, description="angle sweep of the search (deg)")
    candidates: int = Field(4, ge=1, description="search candidates refined by ECC")
    motion: Literal["euclidean", "affine"] = "affine"
    ecc_iterations: int = Field(300, ge=10)
    ecc_eps: float = Field(1e-6, gt=0)
    mask_weight: float = Field(0.0, ge=0, description="tissue-mask weight in the affine fit")
    ecc_blur_um: float = Field(2.0, ge=0, description="blur of the images for ECC (µm)")
    nonrigid: bool = True
    nonrigid_iterations: int = Field(1, ge=0, description="optical-flow passes (1 is best)")
    flow_window_um: float = Field(360.0, gt=0, description="Farneback averaging window (µm)")
    flow_blur_um: float = Field(12.0, ge=0, description="blur of the images for the flow (µm)")
    smooth_um: float = Field(160.0, gt=0, description="Gaussian sigma of the displacement")
    grid_um: float = Field(0.0, ge=0, description="stored displacement grid step (0: auto)")
    max_scale_change: float = Field(1.5, gt=1, description="reject affine scale beyond this")
    min_ncc: float = Field(0.25, description="NCC below this: sections do not match (error)")
    poor_error_um: float = Field(
        25.0, gt=0, description="median residual estimate (µm) above this flags the result poor"
    )
    overlay_px: int = Field(1600, ge=64, description="longest side of overlay.png")


@dataclass
class RegistrationResult:
    """Transform (both directions), error estimate and an overlay image (RGB uint8)."""

    transform: Transform
    error: dict[str, Any]
    overlay: np.ndarray
    poor: bool = False
    log: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> Path:
        """Write `out_dir/transform.json` and `out_dir/overlay.png`; returns the JSON path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = self.transform.save(out_dir / "transform.json")
        with atomic_path(out_dir / "overlay.png") as tmp:
            cv2.imwrite(str(tmp), cv2.cvtColor(self.overlay, cv2.COLOR_RGB2BGR))
        return path


@dataclass
class _Image:
    """A slide thumbnail with what registration needs; `level0` maps its px to level-0 px."""

    rgb: np.ndarray
    feature: np.ndarray
    mask: np.ndarray
    level0: np.ndarray  # 3x3: thumbnail px -> level-0 px (pixel centres)
    info: dict[str, Any]


# -- public API -------------------------------------------------------------------------------
def register(
    fixed_slide_path: str | Path,
    moving_slide_path: str | Path,
    mpp_fixed: float | None = None,
    mpp_moving: float | None = None,
    cfg: RegistrationConfig | None = None,
) -> RegistrationResult:
    """Register the moving (IHC) slide onto the fixed (H&E) slide; RegistrationError if no match."""
    cfg = cfg or RegistrationConfig()
    with (
        open_slide(fixed_slide_path, mpp=mpp_fixed) as fs,
        open_slide(moving_slide_path, mpp=mpp_moving) as ms,
    ):
        work_mpp = _work_mpp(cfg, (fs.mpp, fs.dimensions), (ms.mpp, ms.dimensions))
        fixed = _thumb(fs, work_mpp)
        moving = _thumb(ms, work_mpp)
    return register_images(fixed, moving, work_mpp, cfg)


def register_arrays(
    fixed_rgb: np.ndarray,
    moving_rgb: np.ndarray,
    mpp_fixed: float,
    mpp_moving: float,
    cfg: RegistrationConfig | None = None,
) -> RegistrationResult:
    """Same as `register` for two RGB arrays (level 0 = the arrays) at the given mpp."""
    cfg = cfg or RegistrationConfig()
    fixed_size = (fixed_rgb.shape[1], fixed_rgb.shape[0])
    moving_size = (moving_rgb.shape[1], moving_rgb.shape[0])
    work_mpp = _work_mpp(cfg, (mpp_fixed, fixed_size), (mpp_moving, moving_size))
    fixed = _array_thumb(fixed_rgb, mpp_fixed, work_mpp, "fixed image")
    moving = _array_thumb(moving_rgb, mpp_moving, work_mpp, "moving image")
    return register_images(fixed, moving, work_mpp, cfg)


def warp_moving_region(
    slide: Slide,
    transform: Transform,
    x: int,
    y: int,
    w: int,
    h: int,
    mpp: float,
    fill: int = 255,
) -> np.ndarray:
    """The moving slide resampled onto fixed region (x, y, w, h) (fixed level-0 px) at `mpp`.

    Reads the moving slide's bounding box of that region once, at `mpp`, then remaps.
    """
    fmpp = float(transform.fixed.get("mpp") or mpp)
    out_w, out_h = max(1, round(w * fmpp / mpp)), max(1, round(h * fmpp / mpp))
    sx, sy = w / out_w, h / out_h
    gx, gy = np.meshgrid((np.arange(out_w) + 0.5) * sx + x, (np.arange(out_h) + 0.5) * sy + y)
    pts = transform.to_moving(np.column_stack([gx.ravel(), gy.ravel()]))
    mw, mh = slide.dimensions
    pad = 2 * mpp / slide.mpp
    x0 = int(max(0, math.floor(pts[:, 0].min() - pad)))
    y0 = int(max(0, math.floor(pts[:, 1].min() - pad)))
    x1 = int(min(mw, math.ceil(pts[:, 0].max() + pad)))
    y1 = int(min(mh, math.ceil(pts[:, 1].max() + pad)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return np.full((out_h, out_w, 3), fill, np.uint8)
    region = slide.read(x0, y0, x1 - x0, y1 - y0, mpp)
    rx, ry = (x1 - x0) / region.shape[1], (y1 - y0) / region.shape[0]
    map_x = ((pts[:, 0] - x0) / rx - 0.5).reshape(out_h, out_w).astype(np.float32)
    map_y = ((pts[:, 1] - y0) / ry - 0.5).reshape(out_h, out_w).astype(np.float32)
    return cv2.remap(
        region,
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill, fill, fill),
    )


def _work_mpp(cfg: RegistrationConfig, *slides: tuple[float, tuple[int, int]]) -> float:
    """cfg.work_mpp, finer for small sections (>= MIN_WORK_PX px), never finer than a slide."""
    extent_um = min(mpp * max(size) for mpp, size in slides)
    return max(min(cfg.work_mpp, extent_um / MIN_WORK_PX), *(mpp for mpp, _ in slides))


# -- thumbnails and features ------------------------------------------------------------------
def _thumb(slide: Slide, mpp: float) -> tuple[np.ndarray, dict[str, Any]]:
    rgb = slide.thumbnail(mpp)
    w0, h0 = slide.dimensions
    info = {"path": str(slide.path), "width": w0, "height": h0, "mpp": slide.mpp}
    return rgb, info


def _array_thumb(rgb: np.ndarray, mpp: float, work_mpp: float, name: str) -> tuple:
    rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)
    h0, w0 = rgb.shape[:2]
    size = (max(1, round(w0 * mpp / work_mpp)), max(1, round(h0 * mpp / work_mpp)))
    if size != (w0, h0):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb, {"path": name, "width": w0, "height": h0, "mpp": mpp}


def _pixel_to_level0(thumb_shape: tuple[int, ...], info: dict[str, Any]) -> np.ndarray:
    sx = info["width"] / thumb_shape[1]
    sy = info["height"] / thumb_shape[0]
    # pixel i of the thumbnail covers [i * s, (i + 1) * s) of level 0: its centre is (i + 0.5) s
    return np.array([[sx, 0, 0.5 * sx], [0, sy, 0.5 * sy], [0, 0, 1]])


def _prepare(
    rgb: np.ndarray, info: dict[str, Any], stains: str, cfg: RegistrationConfig, mpp: float
) -> _Image:
    if rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise RegistrationError(
            f"{info['path']}: too small at {cfg.work_mpp} µm/px ({rgb.shape[1]}x{rgb.shape[0]} px)"
        )
    od = optical_density(rgb)
    total = od.sum(axis=2)
    if cfg.ink:
        ink = cv2.dilate(ink_mask(rgb, cfg.ink).astype(np.uint8), np.ones((5, 5), np.uint8))
        total[ink > 0] = 0
        od[ink > 0] = 0
    mask = _tissue(total, cfg.tissue_od, mpp)
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
    feature = (np.clip(chan / scale, 0, 1.5) * mask).astype(np.float32)
    return _Image(rgb, feature, mask, _pixel_to_level0(rgb.shape, info), info)


def _tissue(total_od: np.ndarray, ceiling: float, mpp: float) -> np.ndarray:
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


# -- the pipeline -----------------------------------------------------------------------------
def register_images(
    fixed_thumb: tuple, moving_thumb: tuple, work_mpp: float, cfg: RegistrationConfig
) -> RegistrationResult:
    """Register two (rgb at work_mpp, info) thumbnails."""
    fixed = _prepare(*fixed_thumb, cfg.fixed_stains, cfg, work_mpp)
    moving = _prepare(*moving_thumb, cfg.moving_stains, cfg, work_mpp)
    log: list[str] = []
    # 1. search at coarse resolution
    long_side = max(fixed.feature.shape)
    factor = max(1.0, min(cfg.coarse_mpp / work_mpp, long_side / MIN_COARSE_PX))
    warp, mirrored = _initial_search(fixed, moving, factor, cfg, log)
    if mirrored:
        moving = _flipped(moving)
    # 2. affine refinement, coarse to fine
    warp = _refine_affine(
        _with_mask(fixed, cfg.mask_weight), _with_mask(moving, cfg.mask_weight),
        warp, factor, work_mpp, cfg, log,
    )  # fmt: skip
    _check_affine(warp, cfg, fixed, moving)
    ncc_affine = _ncc_after(fixed, moving, warp, None)
    log.append(f"affine NCC {ncc_affine:.3f}")
    if ncc_affine < cfg.min_ncc:
        raise RegistrationError(
            f"{moving.info['path']} does not match {fixed.info['path']}: after alignment the "
            f"tissue correlates poorly (NCC {ncc_affine:.2f} < {cfg.min_ncc}); "
            "is it a section of the same block?"
        )
    # 3. non-rigid
    flow = None
    ncc = ncc_affine
    if cfg.nonrigid and cfg.nonrigid_iterations > 0:
        flow, ncc = _nonrigid(fixed, moving, warp, ncc_affine, work_mpp, cfg, log)
    # 4. error estimate, transform
    error = _error_estimate(fixed, moving, warp, flow, work_mpp)
    error.update({"ncc_affine": round(ncc_affine, 4), "ncc": round(ncc, 4)})
    poor = bool(
        not error["blocks"]
        or error["residual_um_median"] > cfg.poor_error_um
        or error["blocks_failed_fraction"] > MAX_FAILED_BLOCKS
        or error["tissue_overlap"] < MIN_TISSUE_OVERLAP
    )
    error["poor"] = poor
    transform = _to_transform(fixed, moving, warp, flow, work_mpp, cfg, error)
    transform.meta["mirrored"] = mirrored
    overlay = _overlay(fixed, moving, warp, flow, cfg.overlay_px)
    return RegistrationResult(transform, error, overlay, poor, log)


def _with_mask(img: _Image, weight: float) -> np.ndarray:
    """The feature plus `weight` x the tissue mask: outlines anchor the fit, stain-independent."""
    if weight <= 0:
        return img.feature
    return img.feature + weight * img.mask.astype(np.float32)


def _similarity(c_f: np.ndarray, c_m: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """2x3 warp fixed px -> moving px: x_m = c_m + s R (x_f - c_f)."""
    c, s = math.cos(angle), math.sin(angle)
    lin = scale * np.array([[c, -s], [s, c]])
    t = c_m - lin @ c_f
    return np.hstack([lin, t[:, None]]).astype(np.float32)


def _moments(mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    ys, xs = np.nonzero(mask)
    c = np.array([xs.mean(), ys.mean()])
    cov = np.cov(np.vstack([xs - c[0], ys - c[1]]))
    evals, evecs = np.linalg.eigh(cov)
    angle = math.atan2(evecs[1, 1], evecs[0, 1])  # major axis
    return c, angle, float(len(xs))


def _resize(img: np.ndarray, factor: float) -> np.ndarray:
    if factor <= 1:
        return img
    size = (max(8, round(img.shape[1] / factor)), max(8, round(img.shape[0] / factor)))
    return cv2.resize(img.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def _rescale_warp(warp: np.ndarray, f_from: float, f_to: float) -> np.ndarray:
    """Warp between images downsampled by f_from -> the same warp at downsample f_to."""

    def px(f: float) -> np.ndarray:  # px at downsample f -> px at full work res
        return np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1]])

    full = np.vstack([warp, [0, 0, 1]])
    out = np.linalg.inv(px(f_to)) @ px(f_from) @ full @ np.linalg.inv(px(f_from)) @ px(f_to)
    return out[:2].astype(np.float32)


def _warp(img: np.ndarray, warp: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return cv2.warpAffine(
        img,
        warp,
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def _ncc(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
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


def _search_image(img: _Image, factor: float) -> np.ndarray:
    small = _resize(img.feature, factor)
    small_mask = _resize(img.mask.astype(np.float32), factor)
    mix = 0.5 * small + 0.5 * small_mask
    return cv2.GaussianBlur(mix, (0, 0), 1.5)


def _initial_search(
    fixed: _Image, moving: _Image, factor: float, cfg: RegistrationConfig, log: list[str]
) -> tuple[np.ndarray, bool]:
    """Best (warp at work resolution, mirrored?) from a coarse search + ECC of the best few.

    A mirrored candidate is searched on the horizontally flipped moving image, so every warp
    stays a proper rotation (OpenCV's rigid ECC cannot represent a reflection).
    """
    fs = _search_image(fixed, factor)
    f_mask = _resize(fixed.mask.astype(np.float32), factor) > 0.5
    m_mask = _resize(moving.mask.astype(np.float32), factor) > 0.5
    if f_mask.sum() < 10 or m_mask.sum() < 10:
        raise RegistrationError(
            f"{moving.info['path']} / {fixed.info['path']}: too little tissue at "
            f"{cfg.coarse_mpp} µm/px to register"
        )
    c_f, a_f, area_f = _moments(f_mask)
    weight = cv2.dilate(f_mask.astype(np.uint8), np.ones((5, 5), np.uint8))
    scored = []
    searched = {}
    for mirror in (False, True) if cfg.mirror else (False,):
        img = _flipped(moving) if mirror else moving
        ms = _search_image(img, factor)
        searched[mirror] = ms
        c_m, a_m, area_m = _moments(m_mask[:, ::-1] if mirror else m_mask)
        limit = cfg.max_scale_change
        scale = float(np.clip(math.sqrt(area_m / area_f), 1 / limit, limit))
        # principal axes: the moving major axis onto the fixed one, both ways round
        angles = {round(math.degrees(a_m - a_f + k * math.pi)) % 360 for k in range(2)}
        angles |= {round(d) for d in np.arange(0, 360, cfg.angle_step)}
        for deg in sorted(angles):
            w = _similarity(c_f, c_m, math.radians(deg), scale)
            score = _ncc(fs, _warp(ms, w, fs.shape), weight)
            scored.append((score, deg, mirror, w))
    scored.sort(key=lambda item: -item[0])
    best = None
    for score, deg, mirror, w in _distinct(scored, cfg.candidates):
        ms = searched[mirror]
        w2 = _ecc(fs, ms, w, cv2.MOTION_AFFINE, 100, 1e-4, raise_error=False)
        if w2 is None or not _plausible(w2, cfg.max_scale_change):
            continue
        refined = _ncc(fs, _warp(ms, w2, fs.shape), weight)
        log.append(f"candidate angle {deg} mirror {mirror}: NCC {score:.3f} -> {refined:.3f}")
        if best is None or refined > best[0]:
            best = (refined, w2, mirror, deg)
    if best is None:
        raise RegistrationError(
            f"{moving.info['path']} / {fixed.info['path']}: no initial alignment converged"
        )
    log.append(f"initial: angle {best[3]} mirror {best[2]} NCC {best[0]:.3f}")
    return _rescale_warp(best[1], factor, 1.0), best[2]


def _plausible(warp: np.ndarray, limit: float) -> bool:
    sv = np.linalg.svd(warp[:, :2], compute_uv=False)
    return bool(sv.max() <= limit and sv.min() >= 1 / limit and np.linalg.det(warp[:, :2]) > 0)


def _flipped(img: _Image) -> _Image:
    """The image mirrored left-right; its level-0 matrix still points at the original pixels."""
    w = img.feature.shape[1]
    flip = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])
    return _Image(
        np.ascontiguousarray(img.rgb[:, ::-1]),
        np.ascontiguousarray(img.feature[:, ::-1]),
        np.ascontiguousarray(img.mask[:, ::-1]),
        img.level0 @ flip,
        img.info,
    )


def _distinct(scored: list, n: int) -> list:
    out: list = []
    for item in scored:
        if all(item[2] != o[2] or _angle_gap(item[1], o[1]) > 25 for o in out):
            out.append(item)
        if len(out) >= n:
            break
    return out


def _angle_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _ecc(
    fixed: np.ndarray,
    moving: np.ndarray,
    warp: np.ndarray,
    motion: int,
    iterations: int,
    eps: float,
    raise_error: bool = True,
) -> np.ndarray | None:
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, eps)
    w = warp.astype(np.float32).copy()
    try:
        _, w = cv2.findTransformECC(
            fixed.astype(np.float32), moving.astype(np.float32), w, motion, criteria, None, 1
        )
    except cv2.error as exc:
        if raise_error:
            raise RegistrationError(
                f"affine refinement did not converge ({exc.msg.strip()})"
            ) from None
        return None
    return w


def _refine_affine(
    fixed: np.ndarray,
    moving: np.ndarray,
    warp: np.ndarray,
    factor: float,
    work_mpp: float,
    cfg: RegistrationConfig,
    log: list[str],
) -> np.ndarray:
    motion = cv2.MOTION_AFFINE if cfg.motion == "affine" else cv2.MOTION_EUCLIDEAN
    levels = []
    f = factor
    while f > 1.0:
        levels.append(f)
        f /= 2
    levels.append(1.0)
    current = 1.0
    for lvl in levels:
        w = _rescale_warp(warp, current, lvl)
        sigma = max(1.0, cfg.ecc_blur_um / (work_mpp * lvl))
        fs = cv2.GaussianBlur(_resize(fixed, lvl), (0, 0), sigma)
        ms = cv2.GaussianBlur(_resize(moving, lvl), (0, 0), sigma)
        out = _ecc(fs, ms, w, motion, cfg.ecc_iterations, cfg.ecc_eps, raise_error=False)
        if out is not None:
            warp, current = out, lvl
        else:
            log.append(f"ECC at downsample {lvl:.1f} did not converge; kept previous")
            warp, current = w, lvl
    return _rescale_warp(warp, current, 1.0)


def _check_affine(warp: np.ndarray, cfg: RegistrationConfig, fixed: _Image, moving: _Image) -> None:
    sv = np.linalg.svd(warp[:, :2], compute_uv=False)
    if sv.max() > cfg.max_scale_change or sv.min() < 1 / cfg.max_scale_change:
        raise RegistrationError(
            f"{moving.info['path']} does not match {fixed.info['path']}: the fitted transform "
            f"scales the section by {sv.min():.2f}-{sv.max():.2f} (limit {cfg.max_scale_change})"
        )


def _full_map(warp: np.ndarray, flow: np.ndarray | None, shape: tuple[int, ...]):
    """Maps (map_x, map_y) fixed work px -> moving work px for cv2.remap."""
    h, w = shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    if flow is not None:
        gx = gx + flow[..., 0]
        gy = gy + flow[..., 1]
    mx = warp[0, 0] * gx + warp[0, 1] * gy + warp[0, 2]
    my = warp[1, 0] * gx + warp[1, 1] * gy + warp[1, 2]
    return mx.astype(np.float32), my.astype(np.float32)


def _remap(img: np.ndarray, maps, border: float = 0) -> np.ndarray:
    bv = border if img.ndim == 2 else (border,) * img.shape[2]
    return cv2.remap(
        img, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=bv
    )


def _ncc_after(fixed: _Image, moving: _Image, warp: np.ndarray, flow: np.ndarray | None) -> float:
    maps = _full_map(warp, flow, fixed.feature.shape)
    moved = _remap(moving.feature, maps)
    moved_mask = _remap(moving.mask.astype(np.float32), maps) > 0.5
    weight = fixed.mask | moved_mask
    a = cv2.GaussianBlur(fixed.feature, (0, 0), 1.0)
    b = cv2.GaussianBlur(moved, (0, 0), 1.0)
    return _ncc(a, b, weight)


def _smooth_flow(flow: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    wsum = cv2.GaussianBlur(weight, (0, 0), sigma) + 1e-6
    out = np.empty_like(flow)
    for k in range(2):
        out[..., k] = cv2.GaussianBlur(flow[..., k] * weight, (0, 0), sigma) / wsum
    # far from tissue the weight vanishes: fade to zero displacement there
    fade = np.clip(wsum / max(float(wsum.max()), 1e-6) * 4, 0, 1)
    return out * fade[..., None]


def _nonrigid(
    fixed: _Image,
    moving: _Image,
    warp: np.ndarray,
    ncc_affine: float,
    work_mpp: float,
    cfg: RegistrationConfig,
    log: list[str],
) -> tuple[np.ndarray | None, float]:
    """Dense displacement (fixed work px) from Farneback optical flow, smoothed over tissue.

    Kept only if the NCC does not drop: the flow must explain the images at least as well.
    """
    shape = fixed.feature.shape
    sigma = cfg.smooth_um / work_mpp
    blur = cfg.flow_blur_um / work_mpp
    window = max(5, int(round(cfg.flow_window_um / work_mpp)) | 1)
    a = _to_u8(cv2.GaussianBlur(fixed.feature, (0, 0), blur))
    flow = np.zeros((*shape, 2), np.float32)
    best_flow, best_ncc = None, ncc_affine
    for it in range(cfg.nonrigid_iterations):
        maps = _full_map(warp, flow, shape)
        moved = _remap(moving.feature, maps)
        moved_mask = _remap(moving.mask.astype(np.float32), maps) > 0.5
        b = _to_u8(cv2.GaussianBlur(moved, (0, 0), blur))
        step = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, window, 5, 7, 1.5, 0)
        weight = (fixed.mask & moved_mask).astype(np.float32)
        step = _smooth_flow(step, weight, sigma)
        flow = _compose(flow, step)
        ncc = _ncc_after(fixed, moving, warp, flow)
        log.append(f"non-rigid iteration {it + 1}: NCC {ncc:.3f}")
        if ncc < best_ncc - 0.005:
            break
        best_flow, best_ncc = flow.copy(), ncc
    return best_flow, best_ncc


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 200, 0, 255).astype(np.uint8)


def _compose(flow: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Displacement of x -> x + step(x) followed by the current one: step(x) + flow(x + step)."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    px, py = gx + step[..., 0], gy + step[..., 1]
    fx = cv2.remap(flow[..., 0], px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    fy = cv2.remap(flow[..., 1], px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.dstack([step[..., 0] + fx, step[..., 1] + fy]).astype(np.float32)


def _error_estimate(
    fixed: _Image, moving: _Image, warp: np.ndarray, flow: np.ndarray | None, work_mpp: float
) -> dict[str, Any]:
    """Residual misalignment left after registration, measured independently of the fit.

    The tissue is cut in ~400 µm blocks; in each, OpenCV ECC finds the translation that best
    aligns the fixed block with the registered moving block. Returns the median and 95th
    percentile of those shifts (µm), and the fraction of blocks where no shift under a quarter
    block was found (a sign of gross misalignment).
    """
    maps = _full_map(warp, flow, fixed.feature.shape)
    moved = _remap(moving.feature, maps)
    moved_mask = _remap(moving.mask.astype(np.float32), maps) > 0.5
    both = fixed.mask & moved_mask
    # ~400 µm blocks, smaller for small sections so a few fit in the tissue
    block = int(max(16, min(ERROR_BLOCK_UM / work_mpp, math.sqrt(both.sum()) / 3)))
    h, w = both.shape
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-4)
    shifts, failed = [], 0
    stride = max(block // 2, math.ceil(math.sqrt(h * w / MAX_ERROR_BLOCKS)))
    for y in range(0, h - block + 1, stride):
        for x in range(0, w - block + 1, stride):
            if both[y : y + block, x : x + block].mean() < 0.6:
                continue
            a = np.ascontiguousarray(fixed.feature[y : y + block, x : x + block])
            b = np.ascontiguousarray(moved[y : y + block, x : x + block])
            if a.std() < 1e-3 or b.std() < 1e-3:
                continue
            shift = np.eye(2, 3, dtype=np.float32)
            try:
                _, shift = cv2.findTransformECC(
                    a, b, shift, cv2.MOTION_TRANSLATION, criteria, None, 1
                )
            except cv2.error:
                failed += 1
                continue
            dx, dy = float(shift[0, 2]), float(shift[1, 2])
            if max(abs(dx), abs(dy)) < block / 4:
                shifts.append(math.hypot(dx, dy) * work_mpp)
            else:
                failed += 1
    overlap = float(both.sum() / max(1, (fixed.mask | moved_mask).sum()))
    total = len(shifts) + failed
    out: dict[str, Any] = {
        "method": f"ECC translation in {block * work_mpp:.0f} µm tissue blocks",
        "blocks": len(shifts),
        "blocks_failed_fraction": round(failed / total, 4) if total else 1.0,
        "tissue_overlap": round(overlap, 4),
        "residual_um_median": None,
        "residual_um_p95": None,
    }
    if shifts:
        out["residual_um_median"] = round(float(np.median(shifts)), 2)
        out["residual_um_p95"] = round(float(np.percentile(shifts, 95)), 2)
    return out


def _to_transform(
    fixed: _Image,
    moving: _Image,
    warp: np.ndarray,
    flow: np.ndarray | None,
    work_mpp: float,
    cfg: RegistrationConfig,
    error: dict[str, Any],
) -> Transform:
    s_f, s_m = fixed.level0, moving.level0
    w3 = np.vstack([warp.astype(np.float64), [0, 0, 1]])
    affine = s_m @ w3 @ np.linalg.inv(s_f)  # fixed level-0 -> moving level-0
    disp = None
    origin = spacing = (0.0, 0.0)
    if flow is not None:
        step = max(1, round((cfg.grid_um or cfg.smooth_um / 2) / work_mpp))
        sub = flow[::step, ::step]
        sx, sy = s_f[0, 0], s_f[1, 1]
        disp = np.stack([sub[..., 0] * sx, sub[..., 1] * sy]).astype(np.float32)
        origin = (s_f[0, 2], s_f[1, 2])
        spacing = (step * sx, step * sy)
    f2m = Mapping(affine, disp, origin, spacing)
    inv_spacing = spacing[0] if disp is not None else 1.0
    m2f = invert_mapping(f2m, moving.info["width"], moving.info["height"], inv_spacing)
    return Transform(
        fixed_to_moving=f2m,
        moving_to_fixed=m2f,
        fixed=fixed.info,
        moving=moving.info,
        working_mpp=work_mpp,
        error=error,
        meta={"config": cfg.model_dump()},
    )


def _overlay(
    fixed: _Image, moving: _Image, warp: np.ndarray, flow: np.ndarray | None, max_px: int
) -> np.ndarray:
    """Checkerboard of the sections (left), colour blend (right: fixed magenta, moving green)."""
    maps = _full_map(warp, flow, fixed.feature.shape)
    moved_rgb = _remap(moving.rgb, maps, border=255)
    h, w = fixed.feature.shape
    cell = max(8, min(h, w) // 8)
    yy, xx = np.mgrid[0:h, 0:w]
    checker = ((yy // cell + xx // cell) % 2 == 0)[..., None]
    board = np.where(checker, fixed.rgb, moved_rgb).astype(np.uint8)
    a = _display(fixed.feature, fixed.mask)
    b = _display(_remap(moving.feature, maps), _remap(moving.mask.astype(np.float32), maps) > 0.5)
    blend = np.dstack([255 - b, 255 - a, 255 - b])
    out = np.hstack([board, np.full((h, 4, 3), 255, np.uint8), blend])
    scale = min(1.0, max_px / max(out.shape[:2]))
    if scale < 1:
        out = cv2.resize(
            out,
            (round(out.shape[1] * scale), round(out.shape[0] * scale)),
            interpolation=cv2.INTER_AREA,
        )
    return out


def _display(feature: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A feature stretched to 0-255 between its 5th and 98th percentiles over tissue."""
    values = feature[mask] if mask.any() else feature.ravel()
    lo, hi = np.percentile(values, [5, 98])
    out = np.clip((feature - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return out.astype(np.uint8)
