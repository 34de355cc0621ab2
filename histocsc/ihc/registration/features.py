"""SIFT feature matches between the two sections (OpenCV), for a pose hypothesis and for QC.

Both images' shared stain channel is blurred, brought to `feature_mpp` and contrast-stretched;
SIFT keypoints are matched with Lowe's ratio test, and a similarity transform is fitted by
RANSAC (`cv2.estimateAffinePartial2D`). SIFT descriptors are not mirror-invariant, so the
flipped moving image is matched too. Points are returned in work px (moving points of a
mirrored match in the flipped image's px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from histocsc.ihc.registration.images import SectionImage, flipped

RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 2.0  # RANSAC tolerance, px at the feature resolution
MAX_KEYPOINTS = 2000
MIN_FEATURE_PX = 320  # small sections are matched at a finer resolution to keep this many px
SCALE_RANGE = (0.5, 2.0)  # a similarity outside it is no pose of a serial section


@dataclass
class Matches:
    """Ratio-test matches (work px) and the RANSAC similarity fit (fixed -> moving)."""

    fixed: np.ndarray  # (N, 2)
    moving: np.ndarray  # (N, 2)
    warp: np.ndarray | None  # 2x3 or None
    inlier: np.ndarray  # (N,) bool
    tol: float = 1.0  # RANSAC tolerance (work px): the precision of the matched points

    @property
    def inliers(self) -> int:
        return int(self.inlier.sum())

    def unflipped(self, width: int) -> Matches:
        """The matches of a mirrored search with moving points in the original image's px."""
        moving = self.moving.copy()
        moving[:, 0] = width - 1 - moving[:, 0]
        return Matches(self.fixed, moving, None, self.inlier, self.tol)


def _u8(feature: np.ndarray, scale: float) -> np.ndarray:
    img = feature
    if scale < 1:
        img = cv2.resize(feature, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)


def _keypoints(img: np.ndarray, scale: float):
    sift = cv2.SIFT_create(MAX_KEYPOINTS)
    kp, desc = sift.detectAndCompute(_u8(img, scale), None)
    pts = np.float32([k.pt for k in kp]).reshape(-1, 2)
    # px at the feature scale -> work px (pixel centres)
    return (pts + 0.5) / scale - 0.5, desc


def match_features(
    fixed: SectionImage, moving: SectionImage, work_mpp: float, feature_mpp: float, mirror: bool
) -> dict[bool, Matches]:
    """Matches of the moving section as is (key False) and mirrored (True, if `mirror`)."""
    long_side = max(fixed.feature.shape)
    scale = min(1.0, max(work_mpp / feature_mpp, MIN_FEATURE_PX / long_side))
    pf, df = _keypoints(fixed.feature, scale)
    out: dict[bool, Matches] = {}
    for flip in (False, True) if mirror else (False,):
        img = flipped(moving) if flip else moving
        pm, dm = _keypoints(img.feature, scale)
        out[flip] = _match(pf, df, pm, dm, RANSAC_PX / scale)
    return out


def _match(pf, df, pm, dm, tol: float) -> Matches:
    empty = Matches(np.zeros((0, 2)), np.zeros((0, 2)), None, np.zeros(0, bool), tol)
    if df is None or dm is None or len(df) < 2 or len(dm) < 2:
        return empty
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(df, dm, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    # one match per point pair: SIFT puts several keypoints (orientations) on one spot, and
    # copies of one match would outvote real ones in RANSAC
    seen: set[tuple[int, ...]] = set()
    unique = []
    for g in sorted(good, key=lambda g: g.distance):
        key = (*np.round(pf[g.queryIdx]).astype(int), *np.round(pm[g.trainIdx]).astype(int))
        if key not in seen:
            seen.add(key)
            unique.append(g)
    if len(unique) < 3:
        return empty
    a = pf[[g.queryIdx for g in unique]].astype(np.float64)
    b = pm[[g.trainIdx for g in unique]].astype(np.float64)
    warp, inl = cv2.estimateAffinePartial2D(
        a, b, method=cv2.RANSAC, ransacReprojThreshold=tol, maxIters=5000, confidence=0.999
    )
    scale = math.sqrt(abs(float(np.linalg.det(warp[:, :2])))) if warp is not None else 0.0
    if warp is None or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        # e.g. every fixed point sent to one speck: scale 0, and "inliers" that mean nothing
        return Matches(a, b, None, np.zeros(len(a), bool), tol)
    return Matches(a, b, warp.astype(np.float32), inl.ravel().astype(bool), tol)
