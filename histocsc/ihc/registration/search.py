"""Initial pose: several hypotheses, each refined briefly and judged by image similarity.

Hypotheses, on the moving section as is and mirrored (a mirrored one is searched on the
left-right flipped image, so every warp stays a proper rotation):

- identity and centroid alignment of the tissue masks;
- a similarity transform from SIFT features on the shared stain channel (ratio test, RANSAC);
- a rotation sweep: for every `angle_step`, the best translation by exhaustive normalised
  cross-correlation (OpenCV matchTemplate) of the rotated central part of the moving section
  against the fixed one, so crops that overlap only partly are found too.

Each is judged (`judge`) by `pose_score` (NCC of the blurred channel where the frames
overlap) plus FEATURE_WEIGHT x the share of strong SIFT evidence (>= STRONG_FEATURES RANSAC
inliers) it maps within twice their RANSAC tolerance. A short OpenCV ECC affine fit at the
search resolution is kept only if it raises that judgement, so ECC cannot drift off a pose the
features pin down; the best wins. Strong feature evidence outweighs the similarity on purpose:
on pale or faint sections (a frozen section re-coloured as IHC) the NCC of a wrong pose can
exceed the right one's, while hundreds of matches agreeing on one similarity do not happen by
chance. Identity is always a candidate, so the chosen pose never judges worse than doing
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histocsc.ihc.registration.config import RegistrationConfig
from histocsc.ihc.registration.features import Matches
from histocsc.ihc.registration.images import (
    SectionImage,
    flipped,
    plausible,
    pose_score,
    rescale_warp,
    resize,
)

TEMPLATE_PART = 0.5  # side of the moving centre part matched in the sweep (fraction)
MIN_FEATURE_INLIERS = 8  # a feature hypothesis needs this many RANSAC inliers
STRONG_FEATURES = 12  # from this many inliers, agreeing with the features adds to the score
FEATURE_WEIGHT = 1.0  # score bonus of a pose that agrees with all strong feature inliers
AGREE_TOL = 2.0  # a feature match agrees with a pose within this x its RANSAC tolerance


@dataclass
class Candidate:
    """A pose hypothesis: warp (fixed -> moving px at the search resolution), mirrored?"""

    name: str
    warp: np.ndarray
    mirrored: bool
    score: float = -1.0


def search_image(img: SectionImage, factor: float) -> np.ndarray:
    """The channel at the search resolution, lightly blurred."""
    return cv2.GaussianBlur(resize(img.feature, factor), (0, 0), 1.0)


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy]], np.float32)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else np.array(mask.shape[::-1]) / 2


def hypotheses(
    fixed: SectionImage,
    moving: SectionImage,
    factor: float,
    matches: dict[bool, Matches],
    cfg: RegistrationConfig,
) -> list[Candidate]:
    """All initial poses at the search resolution (downsample `factor` of the work images)."""
    fs = search_image(fixed, factor)
    out = [Candidate("identity", translation(0, 0), False)]
    c_f = centroid(resize(fixed.mask.astype(np.float32), factor) > 0.5)
    for mirror in (False, True) if cfg.mirror else (False,):
        img = flipped(moving) if mirror else moving
        ms = search_image(img, factor)
        c_m = centroid(resize(img.mask.astype(np.float32), factor) > 0.5)
        d = c_m - c_f
        out.append(Candidate("centroid", translation(d[0], d[1]), mirror))
        found = matches.get(mirror)
        if found is not None and found.inliers >= MIN_FEATURE_INLIERS:
            out.append(Candidate("features", rescale_warp(found.warp, 1.0, factor), mirror))
        out += sweep(fs, ms, mirror, cfg)
    return out


def sweep(fs: np.ndarray, ms: np.ndarray, mirror: bool, cfg: RegistrationConfig) -> list:
    """Best translation per rotation angle by matchTemplate; the `cfg.candidates` best."""
    h, w = ms.shape
    th, tw = max(8, round(h * TEMPLATE_PART)), max(8, round(w * TEMPLATE_PART))
    pad_y, pad_x = th, tw
    padded = cv2.copyMakeBorder(fs, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=0)
    # windows mostly outside the fixed image, or flat (background), give spurious peaks
    frame = cv2.copyMakeBorder(
        np.ones_like(fs), pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=0
    )
    ones = np.ones((th, tw), np.float32)
    inside = cv2.matchTemplate(frame, ones, cv2.TM_CCORR) / ones.size
    mean = cv2.matchTemplate(padded, ones, cv2.TM_CCORR) / ones.size
    var = cv2.matchTemplate(padded * padded, ones, cv2.TM_CCORR) / ones.size - mean**2
    usable = (inside >= 1 - TEMPLATE_PART) & (var > 0.1 * float(fs.var()))
    c_m = np.array([(w - 1) / 2, (h - 1) / 2])
    found = []
    for deg in np.arange(0, 360, cfg.angle_step):
        rot = cv2.getRotationMatrix2D((float(c_m[0]), float(c_m[1])), float(deg), 1.0)
        # rotated moving, same centre; crop the centre part as the template
        rotated = cv2.warpAffine(ms, rot, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        y0, x0 = (h - th) // 2, (w - tw) // 2
        tmpl = np.ascontiguousarray(rotated[y0 : y0 + th, x0 : x0 + tw])
        if tmpl.std() < 1e-4:
            continue
        res = np.where(usable, cv2.matchTemplate(padded, tmpl, cv2.TM_CCOEFF_NORMED), -1)
        _, best, _, loc = cv2.minMaxLoc(res)
        # template pixel (x0, y0) of the rotated image lands at fixed (loc - pad)
        shift = np.array([loc[0] - pad_x - x0, loc[1] - pad_y - y0], float)
        # fixed px p -> rotated px p - shift -> moving px inv(rot)(p - shift)
        inv = cv2.invertAffineTransform(rot)
        warp = inv.copy()
        warp[:, 2] = inv[:, 2] - inv[:, :2] @ shift
        found.append(Candidate(f"sweep {deg:g}", warp.astype(np.float32), mirror, float(best)))
    found.sort(key=lambda c: -c.score)
    chosen: list[Candidate] = []
    for cand in found:
        if all(_apart(cand.warp, c.warp, max(h, w) * 0.1) for c in chosen):
            chosen.append(cand)
        if len(chosen) >= cfg.candidates:
            break
    return chosen


def _apart(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    """Two warps differ by more than `tol` px somewhere on a unit square of 100 px."""
    pts = np.array([[0, 0, 1], [100, 0, 1], [0, 100, 1]], float).T
    return bool(np.abs(a @ pts - b @ pts).max() > tol)


def feature_support(warp: np.ndarray, matches: Matches | None, factor: float) -> float:
    """Share of strong RANSAC feature inliers a warp at downsample `factor` maps within
    AGREE_TOL x their RANSAC tolerance (0 without strong evidence)."""
    if matches is None or matches.inliers < STRONG_FEATURES:
        return 0.0
    tol = max(1.0, AGREE_TOL * matches.tol / factor)
    pf = (matches.fixed[matches.inlier] + 0.5) / factor - 0.5
    pm = (matches.moving[matches.inlier] + 0.5) / factor - 0.5
    mapped = pf @ np.asarray(warp, float)[:, :2].T + np.asarray(warp, float)[:, 2]
    return float(np.mean(np.linalg.norm(mapped - pm, axis=1) <= tol))


def judge(
    fixed: np.ndarray, moving: np.ndarray, warp: np.ndarray, matches: Matches | None, factor: float
) -> tuple[float, float]:
    """(`pose_score` + FEATURE_WEIGHT x feature support, the support) of a warp."""
    support = feature_support(warp, matches, factor)
    return pose_score(fixed, moving, warp) + FEATURE_WEIGHT * support, support


def choose(
    fixed: SectionImage,
    moving: SectionImage,
    factor: float,
    candidates: list[Candidate],
    matches: dict[bool, Matches],
    cfg: RegistrationConfig,
    log: list[str],
) -> Candidate:
    """Each candidate, after a short ECC fit if that raises its `judge` score; the best
    (work px warp)."""
    fs = search_image(fixed, factor)
    searched = {False: search_image(moving, factor)}
    if cfg.mirror:
        searched[True] = search_image(flipped(moving), factor)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 60, 1e-4)
    best: Candidate | None = None
    for cand in candidates:
        ms, found = searched[cand.mirrored], matches.get(cand.mirrored)
        warp, (score, support) = cand.warp, judge(fs, ms, cand.warp, found, factor)
        start = score
        try:
            _, refined = cv2.findTransformECC(
                fs, ms, cand.warp.astype(np.float32).copy(), cv2.MOTION_AFFINE, criteria, None, 1
            )
            if plausible(refined, cfg.max_scale_change):
                judged = judge(fs, ms, refined, found, factor)
                if judged[0] > score:
                    warp, (score, support) = refined, judged
        except cv2.error:
            pass
        log.append(
            f"candidate {cand.name} mirror {cand.mirrored}: {start:.3f} -> {score:.3f} "
            f"(features {support:.2f})"
        )
        if best is None or score > best.score + 1e-6:
            best = Candidate(cand.name, warp, cand.mirrored, score)
    assert best is not None  # identity is always there
    log.append(f"initial: {best.name} mirror {best.mirrored} score {best.score:.3f}")
    return Candidate(best.name, rescale_warp(best.warp, factor, 1.0), best.mirrored, best.score)
