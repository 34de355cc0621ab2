"""Refinement of the chosen pose: affine by OpenCV ECC coarse to fine, then smooth non-rigid.

ECC (Evangelidis & Psarakis 2008, `cv2.findTransformECC`) maximises the correlation of the
two channels; OpenCV warps a validity mask of the moving image with it, so crops that overlap
only partly are fitted on their overlap. The non-rigid step is OpenCV Farneback optical flow
between the aligned images, smoothed by a tissue-weighted Gaussian (`smooth_um`), kept only if
the similarity does not drop. Beyond the moving frame the moved image is filled with the fixed
one (no false edge for the flow), and the displacement there is extended from the nearby
tissue rather than dropped to zero.
"""

from __future__ import annotations

import cv2
import numpy as np

from histocsc.ihc.registration.config import RegistrationConfig
from histocsc.ihc.registration.images import (
    SectionImage,
    full_map,
    pose_score,
    remap,
    rescale_warp,
    resize,
)

EXTEND = 3.0  # beyond the tissue, the displacement comes from this x wider smoothing


def ecc(
    fixed: np.ndarray, moving: np.ndarray, warp: np.ndarray, motion: int, iterations: int,
    eps: float,
) -> np.ndarray | None:  # fmt: skip
    """ECC fit from `warp`; None if it does not converge."""
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, eps)
    try:
        _, w = cv2.findTransformECC(
            fixed.astype(np.float32), moving.astype(np.float32),
            warp.astype(np.float32).copy(), motion, criteria, None, 1,
        )  # fmt: skip
    except cv2.error:
        return None
    return w


def refine_affine(
    fixed: np.ndarray,
    moving: np.ndarray,
    warp: np.ndarray,
    factor: float,
    work_mpp: float,
    cfg: RegistrationConfig,
    log: list[str],
) -> np.ndarray:
    """ECC from downsample `factor` (halving) to work resolution, starting at `warp` (work px)."""
    motion = cv2.MOTION_AFFINE if cfg.motion == "affine" else cv2.MOTION_EUCLIDEAN
    levels = []
    f = factor
    while f > 1.0:
        levels.append(f)
        f /= 2
    levels.append(1.0)
    current = 1.0
    for lvl in levels:
        w = rescale_warp(warp, current, lvl)
        sigma = max(1.0, cfg.ecc_blur_um / (work_mpp * lvl))
        fs = cv2.GaussianBlur(resize(fixed, lvl), (0, 0), sigma)
        ms = cv2.GaussianBlur(resize(moving, lvl), (0, 0), sigma)
        out = ecc(fs, ms, w, motion, cfg.ecc_iterations, cfg.ecc_eps)
        if out is None:
            log.append(f"ECC at downsample {lvl:.1f} did not converge; kept previous")
            out = w
        warp, current = out, lvl
    return rescale_warp(warp, current, 1.0)


def nonrigid(
    fixed: SectionImage,
    moving: SectionImage,
    warp: np.ndarray,
    score_affine: float,
    work_mpp: float,
    cfg: RegistrationConfig,
    log: list[str],
) -> tuple[np.ndarray | None, float]:
    """Dense displacement (fixed work px) from Farneback optical flow, smoothed over tissue.

    Kept only if the similarity does not drop: the flow must explain the images at least as
    well as the affine fit.
    """
    shape = fixed.feature.shape
    sigma = cfg.smooth_um / work_mpp
    blur = cfg.flow_blur_um / work_mpp
    window = max(5, int(round(cfg.flow_window_um / work_mpp)) | 1)
    a = _to_u8(cv2.GaussianBlur(fixed.feature, (0, 0), blur))
    flow = np.zeros((*shape, 2), np.float32)
    best_flow, best = None, score_affine
    for it in range(cfg.nonrigid_iterations):
        maps = full_map(warp, flow, shape)
        moved = remap(moving.feature, maps)
        # where the moving frame does not reach, show the flow the fixed image: no false edge
        cover = remap(np.ones(shape, np.float32), maps) > 0.99
        moved = np.where(cover, moved, fixed.feature)
        moved_mask = remap(moving.mask.astype(np.float32), maps) > 0.5
        b = _to_u8(cv2.GaussianBlur(moved, (0, 0), blur))
        step = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, window, 5, 7, 1.5, 0)
        weight = (fixed.mask & moved_mask).astype(np.float32)
        step = _smooth_flow(step, weight, sigma)
        flow = _compose(flow, step)
        score = pose_score(fixed.feature, moving.feature, full_map(warp, flow, shape))
        log.append(f"non-rigid iteration {it + 1}: score {score:.3f}")
        if score < best - 0.005:
            break
        best_flow, best = flow.copy(), score
    return best_flow, best


def _smooth_flow(flow: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Tissue-weighted Gaussian smoothing; where the weight runs out (e.g. beyond the moving
    frame) the displacement continues from a wider smoothing, then fades to zero."""
    near, trust = _weighted_blur(flow, weight, sigma)
    far, far_trust = _weighted_blur(flow, weight, EXTEND * sigma)
    return near * trust + far * far_trust * (1 - trust)


def _weighted_blur(
    flow: np.ndarray, weight: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """(normalised convolution of the flow, how much weight backs it: 0-1), per pixel."""
    wsum = cv2.GaussianBlur(weight, (0, 0), sigma) + 1e-6
    out = np.empty_like(flow)
    for k in range(2):
        out[..., k] = cv2.GaussianBlur(flow[..., k] * weight, (0, 0), sigma) / wsum
    trust = np.clip(wsum / max(float(wsum.max()), 1e-6) * 4, 0, 1)
    return out, trust[..., None]


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
