"""Error estimate and the `poor` flag, from evidence the optimiser did not tune.

- Block matching: the tissue of the registered pair is cut into ~400 µm blocks; each fixed
  block is matched against the registered moving image by exhaustive normalised
  cross-correlation (OpenCV matchTemplate) over shifts up to `SEARCH_UM`. Where the best match
  is clear (peak NCC >= MIN_PEAK, inside the search window), its shift is a measured residual;
  on a wrong pose the peaks are weak or scattered. ECC and the optical flow optimise a global
  similarity; this local exhaustive search does not share their local optima.
- Feature agreement: SIFT matches (ratio test) and the RANSAC similarity fitted to them, made
  without the final transform; how many of the RANSAC inliers the final transform maps within
  `AGREE_UM`, and their residual.
- Tissue overlap within the common frame.
- Inverse consistency: fixed tissue points mapped to the moving slide and back through the
  stored inverse (`transform.json` holds both directions) must return where they started.

`poor` when there are too few clear blocks to estimate the error, their median shift exceeds
`poor_error_um` (the limit; `prepare` sets it from the tile size), the tissue overlaps poorly
(unless many feature inliers confirm the pose), many feature inliers disagree with the final
transform, or the inverse does not return to the start. A low share of clear blocks only lowers
`confidence`, unless their residuals also spread beyond twice the limit.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from histocsc.ihc.registration.config import RegistrationConfig
from histocsc.ihc.registration.features import Matches
from histocsc.ihc.registration.images import SectionImage, remap
from histocsc.ihc.transform import Transform

BLOCK_UM = 400.0  # block side
MIN_BLOCK_PX = 48  # ... and at least this many px, so a block holds some structure
SEARCH_UM = 200.0  # largest shift searched per block
MAX_BLOCKS = 400  # at most about this many block positions
MIN_PEAK = 0.5  # a block's best match counts as clear from this NCC
MIN_CLEAR_BLOCKS = 6  # poor: fewer clear blocks than this (unless features confirm the pose)
MIN_CLEAR_FRACTION = 0.2  # poor: fewer than this fraction of the tried blocks are clear
MIN_TISSUE_OVERLAP = 0.5  # poor: tissue masks overlap less than this in the common frame
AGREE_UM = 60.0  # a feature match agrees with the transform within this
STRONG_FEATURES = 12  # this many RANSAC inliers is strong evidence of a pose
MIN_AGREE_FRACTION = 0.5  # poor: strong feature evidence, and fewer agree than this
CONFIRM_FRACTION = 0.8  # strong feature evidence with this many agreeing confirms the pose
MAX_ROUNDTRIP_PX = 1.0  # poor: fixed -> moving -> fixed misses by more (p95, work px)
ROUNDTRIP_POINTS = 2000  # about this many fixed tissue points are sent there and back
NEAR_LIMIT = 0.8  # an error estimate above this share of the limit lowers the confidence


def assess(
    fixed: SectionImage,
    moving: SectionImage,
    maps: tuple[np.ndarray, np.ndarray],
    matches: Matches | None,
    work_mpp: float,
    cfg: RegistrationConfig,
) -> dict[str, Any]:
    """The error estimate and QC figures of a registration given as remap `maps`.

    `maps` (map_x, map_y): for every fixed work px, the moving work px it lands on.
    """
    moved = remap(moving.feature, maps)
    cover = remap(np.ones(moving.feature.shape, np.float32), maps) > 0.99
    moved_mask = (remap(moving.mask.astype(np.float32), maps) > 0.5) & cover
    fixed_mask = fixed.mask & cover
    union = (fixed_mask | moved_mask).sum()
    out: dict[str, Any] = {
        "frame_overlap": round(float(cover.mean()), 4),
        "tissue_overlap": round(float((fixed_mask & moved_mask).sum() / max(1, union)), 4),
    }
    out.update(block_residuals(fixed.feature, moved, fixed_mask & moved_mask, work_mpp))
    out.update(feature_agreement(matches, maps, work_mpp))
    out["poor"], out["poor_reasons"] = poor_reasons(out, cfg)
    return out


def block_residuals(
    fixed: np.ndarray, moved: np.ndarray, both: np.ndarray, work_mpp: float
) -> dict[str, Any]:
    """Shifts (µm) of clear best matches of fixed tissue blocks in the registered image."""
    block = int(max(12, min(max(BLOCK_UM / work_mpp, MIN_BLOCK_PX), math.sqrt(both.sum()) / 3)))
    radius = max(3, round(min(SEARCH_UM / work_mpp, block / 2)))
    h, w = both.shape
    a_img = cv2.GaussianBlur(fixed, (0, 0), 1.0)
    b_img = cv2.GaussianBlur(moved, (0, 0), 1.0)
    stride = max(block // 2, math.ceil(math.sqrt(h * w / MAX_BLOCKS)))
    shifts, tried = [], 0
    for y in range(radius, h - block - radius + 1, stride):
        for x in range(radius, w - block - radius + 1, stride):
            if both[y : y + block, x : x + block].mean() < 0.6:
                continue
            tmpl = np.ascontiguousarray(a_img[y : y + block, x : x + block])
            area = np.ascontiguousarray(
                b_img[y - radius : y + block + radius, x - radius : x + block + radius]
            )
            if tmpl.std() < 1e-3 or area.std() < 1e-3:
                continue
            tried += 1
            res = cv2.matchTemplate(area, tmpl, cv2.TM_CCOEFF_NORMED)
            _, peak, _, (px, py) = cv2.minMaxLoc(res)
            inside = 0 < px < res.shape[1] - 1 and 0 < py < res.shape[0] - 1
            if peak < MIN_PEAK or not inside:
                continue
            dx = px + _parabola(res[py, px - 1 : px + 2]) - radius
            dy = py + _parabola(res[py - 1 : py + 2, px]) - radius
            shifts.append(math.hypot(dx, dy) * work_mpp)
    out: dict[str, Any] = {
        "method": f"block matching ({block * work_mpp:.0f} µm blocks, ±{radius * work_mpp:.0f} µm)",
        "blocks_tried": tried,
        "blocks": len(shifts),
        "blocks_clear_fraction": round(len(shifts) / tried, 4) if tried else 0.0,
        "residual_um_median": None,
        "residual_um_p95": None,
    }
    if shifts:
        out["residual_um_median"] = round(float(np.median(shifts)), 2)
        out["residual_um_p95"] = round(float(np.percentile(shifts, 95)), 2)
    return out


def _parabola(v: np.ndarray) -> float:
    den = v[0] - 2 * v[1] + v[2]
    return float(np.clip(0.5 * (v[0] - v[2]) / den, -0.5, 0.5)) if den < 0 else 0.0


def feature_agreement(matches: Matches | None, maps, work_mpp: float) -> dict[str, Any]:
    """How many RANSAC feature inliers the final transform maps within AGREE_UM."""
    out: dict[str, Any] = {"feature_inliers": 0, "feature_agree": 0, "feature_residual_um": None}
    if matches is None or matches.inliers == 0:
        return out
    pf = matches.fixed[matches.inlier]
    pm = matches.moving[matches.inlier]
    h, w = maps[0].shape
    inside = (pf[:, 0] >= 0) & (pf[:, 0] <= w - 1) & (pf[:, 1] >= 0) & (pf[:, 1] <= h - 1)
    pf, pm = pf[inside], pm[inside]
    if not len(pf):
        return out
    coords = pf.astype(np.float32).reshape(-1, 1, 2)
    mx = cv2.remap(maps[0], coords[..., 0], coords[..., 1], cv2.INTER_LINEAR).ravel()
    my = cv2.remap(maps[1], coords[..., 0], coords[..., 1], cv2.INTER_LINEAR).ravel()
    resid = np.hypot(mx - pm[:, 0], my - pm[:, 1]) * work_mpp
    agree = resid <= AGREE_UM
    out["feature_inliers"] = int(len(pf))
    out["feature_agree"] = int(agree.sum())
    out["feature_residual_um"] = round(float(np.median(resid)), 2)
    return out


def poor_reasons(error: dict[str, Any], cfg: RegistrationConfig) -> tuple[bool, list[str]]:
    """Whether the evidence says the registration is unreliable, and why.

    Also records, in `error`: `poor_evidence` (reasons other than the error size: a caller with
    another error limit re-judges with `residual_um_median` and this), and `confidence`
    ("high" / "low") with `confidence_notes`: a low share of clearly matching blocks lowers the
    confidence but does not refuse an error estimate that is within the limit.
    """
    why, notes = [], []
    n, agree = error["feature_inliers"], error["feature_agree"]
    confirmed = n >= STRONG_FEATURES and agree >= CONFIRM_FRACTION * n
    if error["blocks"] < MIN_CLEAR_BLOCKS and not confirmed:
        why.append(
            f"too few tissue blocks match clearly to estimate the error ({error['blocks']} of "
            f"{error['blocks_tried']})"
        )
    elif error["blocks_clear_fraction"] < MIN_CLEAR_FRACTION:
        notes.append(
            f"few tissue blocks match clearly ({error['blocks']} of {error['blocks_tried']})"
        )
        if not confirmed and (error["residual_um_p95"] or 0) > 2 * cfg.poor_error_um:
            # scattered clear blocks with a wide spread: the pose is not established
            why.append(
                f"few tissue blocks match clearly ({error['blocks']} of {error['blocks_tried']})"
                f" and their residuals spread to {error['residual_um_p95']} µm (p95)"
            )
    if error["tissue_overlap"] < MIN_TISSUE_OVERLAP and not confirmed:
        # masks of a pale IHC and its H&E can differ; many agreeing features outweigh that
        why.append(f"tissue overlaps poorly ({error['tissue_overlap']})")
    if n >= STRONG_FEATURES and agree < MIN_AGREE_FRACTION * n:
        why.append(f"{n - agree} of {n} feature matches disagree with the transform")
    error["poor_evidence"] = list(why)
    median = error["residual_um_median"]
    if not error["poor_evidence"] and median is not None and median > cfg.poor_error_um:
        why.append(f"block residual {median} µm > {cfg.poor_error_um:g} µm")
    elif median is not None and median > NEAR_LIMIT * cfg.poor_error_um:
        # the estimate is not exact: a true error just above the limit must not pass silently
        notes.append(f"error estimate {median} µm is near the limit {cfg.poor_error_um:g} µm")
    error["error_limit_um"] = cfg.poor_error_um
    error["confidence"] = "low" if notes else "high"
    error["confidence_notes"] = notes
    return bool(why), why


def judge(error: dict[str, Any], limit_um: float) -> tuple[bool, list[str]]:
    """(poor, reasons) of a stored error estimate against another error limit (µm)."""
    if "poor_evidence" not in error:  # written before the limit could be re-judged
        return bool(error.get("poor")), list(error.get("poor_reasons") or [])
    why = list(error["poor_evidence"])
    median = error.get("residual_um_median")
    if not why and median is not None and median > limit_um:
        why.append(f"block residual {median} µm > {limit_um:g} µm")
    return bool(why), why


def inverse_consistency(
    transform: Transform, fixed: SectionImage, work_mpp: float
) -> dict[str, Any]:
    """Fixed tissue points -> moving -> fixed through the stored inverse: the miss (µm).

    Flags (in place of a second, moving -> fixed registration) an inverse that does not undo
    the forward map, e.g. a folding displacement field.
    """
    ys, xs = np.nonzero(fixed.mask)
    step = max(1, len(xs) // ROUNDTRIP_POINTS)
    pts = np.column_stack([xs[::step], ys[::step], np.ones(len(xs[::step]))]) @ fixed.level0[:2].T
    moved = transform.to_moving(pts)
    w, h = transform.moving["width"], transform.moving["height"]
    inside = (moved[:, 0] >= 0) & (moved[:, 0] <= w) & (moved[:, 1] >= 0) & (moved[:, 1] <= h)
    if not inside.any():
        return {"roundtrip_um_p95": None}
    back = transform.to_fixed(moved[inside])
    level0_mpp = work_mpp / float(fixed.level0[0, 0])
    miss = np.linalg.norm(back - pts[inside], axis=1) * level0_mpp
    return {"roundtrip_um_p95": round(float(np.percentile(miss, 95)), 3)}


def flag_roundtrip(error: dict[str, Any], work_mpp: float) -> None:
    """Add the inverse-consistency reason to `error` (in place) when the inverse misses."""
    miss = error.get("roundtrip_um_p95")
    if miss is not None and miss > MAX_ROUNDTRIP_PX * work_mpp:
        error["poor"] = True
        reason = f"the inverse transform misses by {miss} µm (p95) on the way back"
        error["poor_reasons"].append(reason)
        error.setdefault("poor_evidence", []).append(reason)
