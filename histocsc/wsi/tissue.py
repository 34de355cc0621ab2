"""Tissue detection on a low-resolution RGB image: a boolean mask of stained tissue.

Steps: a stain channel (HSV saturation or optical density), an Otsu threshold clipped to a safe
range (so an all-glass or all-tissue image is not split in two), removal of marker-pen ink
(red, green, blue, black) and of near-black pixels, then morphological clean-up with minimum
object and hole sizes given in µm² so the result does not depend on the thumbnail resolution.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from histocsc.config import StrictModel
from histocsc.wsi.optical_density import optical_density

InkColor = Literal["red", "green", "blue", "black"]


class TissueConfig(StrictModel):
    """Parameters of the tissue mask."""

    mpp: float = Field(8.0, gt=0, description="resolution of the thumbnail the mask is made on")
    method: Literal["saturation", "optical_density"] = "saturation"
    saturation_range: tuple[float, float] = Field(
        (0.06, 0.15), description="Otsu threshold on HSV saturation (0-1) is clipped to this"
    )
    od_range: tuple[float, float] = Field(
        (0.06, 0.10), description="Otsu threshold on mean optical density is clipped to this"
    )
    min_object_um2: float = Field(5000.0, ge=0, description="smaller tissue pieces are dropped")
    min_hole_um2: float = Field(5000.0, ge=0, description="smaller holes in tissue are filled")
    close_um: float = Field(8.0, ge=0, description="radius of a closing that joins nearby pieces")
    smooth_um: float = Field(4.0, ge=0, description="Gaussian blur (sigma) before thresholding")
    ink: list[InkColor] = Field(
        default_factory=lambda: ["red", "green", "blue", "black"],
        description="marker-pen colours removed from the mask",
    )

    @model_validator(mode="after")
    def _ranges_ordered(self) -> TissueConfig:
        for name in ("saturation_range", "od_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be two numbers 0 <= low <= high, got {(lo, hi)}")
        return self


def stain_channel(rgb: np.ndarray, method: str) -> np.ndarray:
    """Per-pixel stain strength: HSV saturation (0-1) or mean optical density."""
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    if method == "saturation":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)[..., 1].astype(np.float32) / 255.0
    return optical_density(rgb).mean(axis=2)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between[:-1]))]) if bins > 1 else float(centers[0])


def auto_threshold(values: np.ndarray, bounds: tuple[float, float]) -> float:
    """Otsu's threshold on `values`, clipped to `bounds`."""
    lo, hi = bounds
    if values.size == 0 or float(values.min()) == float(values.max()):
        return lo
    return float(np.clip(otsu(values), lo, hi))


def ink_mask(rgb: np.ndarray, colors: list[str] | tuple[str, ...]) -> np.ndarray:
    """Pixels whose colour is marker-pen ink rather than haematoxylin or eosin.

    H&E hues lie between blue-purple (haematoxylin, ~260-300°) and pink (eosin, ~320-345°).
    Ink is strongly saturated outside that band (green/cyan, pure blue, orange-red) or is a
    dark grey without the purple cast of nuclei (black).
    """
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2].astype(np.float32) / 255.0
    mx = rgb.max(axis=2).astype(np.int16)
    chroma = mx - rgb.min(axis=2).astype(np.int16)
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    out = np.zeros(rgb.shape[:2], bool)
    if "red" in colors:
        # eosin keeps blue well above green; red ink has blue close to green; brown (DAB,
        # pigment: blue well below green, hue > ~15 deg) is not red ink
        redness = (b - g) / np.maximum(r - g, 1)
        reddish = (r - g > 10) & (sat > 0.1) & (redness > -0.25)
        out |= reddish & (redness < 0.22)
        out |= reddish & (val < 0.5) & (sat > 0.3) & (redness < 0.4)  # dark, dense red ink
    if "green" in colors:
        out |= (sat > 0.12) & (hue >= 60) & (hue < 200)
    if "blue" in colors:
        out |= (sat > 0.25) & (hue >= 200) & (hue < 250)
    if "black" in colors:
        out |= (val < 0.45) & (chroma < 40)
    return out


def remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected objects smaller than `min_px` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes (background not connected to the border) smaller than `max_px` pixels."""
    if max_px <= 1:
        return mask
    padded = np.pad(~mask, 1, constant_values=True)  # the outside is one connected background
    n, labels, stats, _ = cv2.connectedComponentsWithStats(padded.astype(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < max_px
    small[0] = False
    small[labels[0, 0]] = False
    filled = small[labels][1:-1, 1:-1]
    return mask | filled


def tissue_mask(rgb: np.ndarray, mpp: float, cfg: TissueConfig | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are `mpp` µm wide."""
    cfg = cfg or TissueConfig()
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    channel = stain_channel(rgb, cfg.method)
    sigma = cfg.smooth_um / mpp
    if sigma >= 0.3:
        channel = cv2.GaussianBlur(channel, (0, 0), sigma)
    bounds = cfg.saturation_range if cfg.method == "saturation" else cfg.od_range
    # Otsu on pixels that are neither pure white padding nor black borders
    usable = (rgb.min(axis=2) < 250) & (rgb.max(axis=2) > 20)
    mask = channel > auto_threshold(channel[usable], bounds)
    if cfg.ink:
        mask &= ~ink_mask(rgb, cfg.ink)
    px_area = mpp * mpp
    radius = int(round(cfg.close_um / mpp))
    if radius >= 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        mask = closed.astype(bool)
    mask = remove_small(mask, cfg.min_object_um2 / px_area)
    mask = fill_small_holes(mask, cfg.min_hole_um2 / px_area)
    return mask


def tile_tissue_fraction(rgb: np.ndarray, mpp: float, cfg: TissueConfig | None = None) -> float:
    """Fraction of an image (e.g. one tile) covered by tissue, judged at `cfg.mpp`.

    The image is first brought to the mask resolution, so a single tile is judged the way the
    tile grid judges it on the slide thumbnail.
    """
    cfg = cfg or TissueConfig()
    h, w = rgb.shape[:2]
    scale = mpp / cfg.mpp
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(np.ascontiguousarray(rgb[..., :3]), size, interpolation=cv2.INTER_AREA)
        mpp = cfg.mpp
    return float(tissue_mask(rgb, mpp, cfg).mean())


def is_tissue_tile(
    rgb: np.ndarray, mpp: float, min_fraction: float = 0.5, cfg: TissueConfig | None = None
) -> bool:
    """The tile filter: keep a tile when at least `min_fraction` of it is tissue."""
    return tile_tissue_fraction(rgb, mpp, cfg) >= min_fraction
