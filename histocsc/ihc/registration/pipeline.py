"""The registration flow on two slides or arrays, and the Transform it produces.

1. One thumbnail per slide at the working resolution (`work_mpp`, finer for small sections;
   never finer than the slides) with a shared stain channel (`images`).
2. Initial pose from several hypotheses judged by image similarity (`search`, `features`).
3. Affine refinement by ECC coarse to fine, kept only if it judges (similarity + agreement
   with strong feature evidence, `search.judge`) at least as well as the start pose; identity
   replaces a fit that judges below it; optional smooth non-rigid refinement (`refine`).
4. Error estimate and `poor` flag from independent evidence, including the round trip
   through the stored inverse (`qc`); overlay.png (`overlay`).

Sections that do not match (similarity after the affine fit below `min_ncc`, an implausible
scale) raise RegistrationFailure naming both files, with an overlay of what was tried.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from histocsc.errors import SlideError
from histocsc.ihc.registration.config import (
    RegistrationConfig,
    RegistrationFailure,
    RegistrationResult,
)
from histocsc.ihc.registration.features import match_features
from histocsc.ihc.registration.images import (
    SectionImage,
    array_thumb,
    flipped,
    full_map,
    plausible,
    pose_score,
    prepare,
    slide_thumb,
)
from histocsc.ihc.registration.overlay import overlay
from histocsc.ihc.registration.qc import assess, flag_roundtrip, inverse_consistency
from histocsc.ihc.registration.refine import nonrigid, refine_affine
from histocsc.ihc.registration.search import choose, hypotheses, judge
from histocsc.ihc.transform import Mapping, Transform, invert_mapping
from histocsc.wsi.slide import Slide, open_slide

MIN_WORK_PX = 512  # small sections are registered at a finer resolution to keep this many px
MIN_COARSE_PX = 128  # ... and searched on at least this many
IDENTITY = np.eye(2, 3, dtype=np.float32)


def register(
    fixed_slide_path: str | Path,
    moving_slide_path: str | Path,
    mpp_fixed: float | None = None,
    mpp_moving: float | None = None,
    cfg: RegistrationConfig | None = None,
    mpp_options: tuple[str, str] | None = None,
) -> RegistrationResult:
    """Register the moving (IHC) slide onto the fixed (H&E) slide; RegistrationError if no match.

    `mpp_options`: the command-line options giving each pixel size, named in the error raised
    when a slide records none (e.g. ("--mpp-fixed", "--mpp-moving")).
    """
    cfg = cfg or RegistrationConfig()
    with (
        open_slide(fixed_slide_path, mpp=mpp_fixed) as fs,
        open_slide(moving_slide_path, mpp=mpp_moving) as ms,
    ):
        for slide, role, k in ((fs, "fixed (H&E)", 0), (ms, "moving (IHC)", 1)):
            if mpp_options and not slide.has_mpp:
                raise SlideError(
                    f"{slide.path}: the {role} image records no pixel size; pass it with "
                    f"{mpp_options[k]} (microns per pixel at full resolution, e.g. 0.5 for 20x)"
                )
        work_mpp = work_resolution(cfg, (fs.mpp, fs.dimensions), (ms.mpp, ms.dimensions))
        fixed = slide_thumb(fs, work_mpp)
        moving = slide_thumb(ms, work_mpp)
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
    work_mpp = work_resolution(cfg, (mpp_fixed, fixed_size), (mpp_moving, moving_size))
    fixed = array_thumb(fixed_rgb, mpp_fixed, work_mpp, "fixed image")
    moving = array_thumb(moving_rgb, mpp_moving, work_mpp, "moving image")
    return register_images(fixed, moving, work_mpp, cfg)


def work_resolution(cfg: RegistrationConfig, *slides: tuple[float, tuple[int, int]]) -> float:
    """cfg.work_mpp, finer for small sections (>= MIN_WORK_PX px), never finer than a slide."""
    extent_um = min(mpp * max(size) for mpp, size in slides)
    return max(min(cfg.work_mpp, extent_um / MIN_WORK_PX), *(mpp for mpp, _ in slides))


def register_images(
    fixed_thumb: tuple, moving_thumb: tuple, work_mpp: float, cfg: RegistrationConfig
) -> RegistrationResult:
    """Register two (rgb at work_mpp, info) thumbnails."""
    fixed = prepare(*fixed_thumb, cfg.fixed_stains, cfg, work_mpp)
    original = prepare(*moving_thumb, cfg.moving_stains, cfg, work_mpp)
    log: list[str] = []
    # 1. hypotheses at the search resolution
    long_side = max(fixed.feature.shape)
    factor = max(1.0, min(cfg.coarse_mpp / work_mpp, long_side / MIN_COARSE_PX))
    matches = match_features(fixed, original, work_mpp, cfg.feature_mpp, cfg.mirror)
    cands = hypotheses(fixed, original, factor, matches, cfg)
    best = choose(fixed, original, factor, cands, matches, cfg, log)
    moving = flipped(original) if best.mirrored else original
    # 2. affine refinement, kept if it judges better; never worse than identity
    warp = refine_affine(
        _with_mask(fixed, cfg.mask_weight), _with_mask(moving, cfg.mask_weight),
        best.warp, factor, work_mpp, cfg, log,
    )  # fmt: skip
    found = matches.get(best.mirrored)
    judged, start = (
        judge(fixed.feature, moving.feature, w, found, 1.0)[0] for w in (warp, best.warp)
    )
    if start > judged or not plausible(warp, cfg.max_scale_change):
        log.append(f"the refinement judged worse ({start:.3f} -> {judged:.3f}): start kept")
        warp, judged = best.warp, start
    identity_ncc = pose_score(fixed.feature, original.feature, IDENTITY)
    identity = judge(fixed.feature, original.feature, IDENTITY, matches.get(False), 1.0)[0]
    log.append(f"affine judged {judged:.3f} (identity {identity:.3f})")
    if judged < identity:
        log.append("the fit judges below identity: identity kept")
        moving, warp, best.mirrored = original, IDENTITY.copy(), False
    score = pose_score(fixed.feature, moving.feature, warp)

    def failure(reason: str) -> RegistrationFailure:
        shown = overlay(fixed, moving, warp, None, cfg.overlay_px, f"FAILED: {reason}")
        return RegistrationFailure(
            f"{moving.info['path']} does not match {fixed.info['path']}: {reason}", shown
        )

    sv = np.linalg.svd(warp[:, :2], compute_uv=False)
    if sv.max() > cfg.max_scale_change or sv.min() < 1 / cfg.max_scale_change:
        raise failure(
            f"the fitted transform scales the section by {sv.min():.2f}-{sv.max():.2f} "
            f"(limit {cfg.max_scale_change})"
        )
    if score < cfg.min_ncc:
        raise failure(
            f"after alignment the tissue correlates poorly (NCC {score:.2f} < {cfg.min_ncc}); "
            "is it a section of the same block?"
        )
    # 3. non-rigid
    flow, final = None, score
    if cfg.nonrigid and cfg.nonrigid_iterations > 0:
        flow, final = nonrigid(fixed, moving, warp, score, work_mpp, cfg, log)
    # 4. error estimate, transform, overlay
    maps = full_map(warp, flow, fixed.feature.shape)
    error = assess(fixed, moving, maps, matches.get(best.mirrored), work_mpp, cfg)
    error.update(
        {
            "ncc_identity": round(identity_ncc, 4),
            "ncc_affine": round(score, 4),
            "ncc": round(final, 4),
        }
    )
    error["initial_pose"] = best.name
    transform = to_transform(fixed, moving, warp, flow, work_mpp, cfg, error)
    transform.meta["mirrored"] = best.mirrored
    error.update(inverse_consistency(transform, fixed, work_mpp))  # transform.error is `error`
    flag_roundtrip(error, work_mpp)
    banner = "POOR: " + "; ".join(error["poor_reasons"]) if error["poor"] else ""
    shown = overlay(fixed, moving, warp, flow, cfg.overlay_px, banner)
    return RegistrationResult(transform, error, shown, error["poor"], log)


def assess_transform(
    fixed_thumb: tuple,
    moving_thumb: tuple,
    work_mpp: float,
    transform: Transform,
    cfg: RegistrationConfig | None = None,
) -> dict:
    """The QC figures of any transform between two thumbnails (e.g. a deliberately broken one)."""
    cfg = cfg or RegistrationConfig()
    fixed = prepare(*fixed_thumb, cfg.fixed_stains, cfg, work_mpp)
    moving = prepare(*moving_thumb, cfg.moving_stains, cfg, work_mpp)
    h, w = fixed.feature.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pts = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)]) @ fixed.level0[:2].T
    moved = transform.to_moving(pts)
    inv = np.linalg.inv(moving.level0)
    mx = (moved @ inv[:2, :2].T + inv[:2, 2]).astype(np.float32)
    maps = (mx[:, 0].reshape(h, w), mx[:, 1].reshape(h, w))
    found = match_features(fixed, moving, work_mpp, cfg.feature_mpp, cfg.mirror)
    best = max(found, key=lambda k: found[k].inliers)
    matches = found[best].unflipped(moving.feature.shape[1]) if best else found[best]
    return assess(fixed, moving, maps, matches, work_mpp, cfg)


def _with_mask(img: SectionImage, weight: float) -> np.ndarray:
    """The feature plus `weight` x the tissue mask: outlines anchor the fit, stain-independent."""
    if weight <= 0:
        return img.feature
    return img.feature + weight * img.mask.astype(np.float32)


def to_transform(
    fixed: SectionImage,
    moving: SectionImage,
    warp: np.ndarray,
    flow: np.ndarray | None,
    work_mpp: float,
    cfg: RegistrationConfig,
    error: dict,
) -> Transform:
    """The work-px warp (+ flow) as a level-0 Transform, both directions."""
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
        region, map_x, map_y, cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(fill, fill, fill),
    )  # fmt: skip
