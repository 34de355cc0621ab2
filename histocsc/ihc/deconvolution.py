"""Optical density and colour deconvolution with named or estimated stain matrices.

Unit everywhere: base-10 optical density (OD), as QuPath uses,
``OD = -log10(I / I0)`` with ``I`` clipped to ``[1, I0]`` and ``I0 = 255`` (white glass).
OD 0 is white; the darkest 8-bit pixel gives ``log10(255) ~ 2.41``. Deconvolved channels are
the OD each stain contributes (same unit), so thresholds in configurations are OD values.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from histocsc.config import StrictModel
from histocsc.errors import ConfigError
from histocsc.wsi.optical_density import optical_density

# dab_od: residual below -RESIDUAL_GATE x DAB means the colour is not H-DAB (e.g. eosin)
RESIDUAL_GATE = 0.1

# Stain OD vectors (R, G, B), rows: first stain, second stain, (residual computed when absent).
# H-DAB: Ruifrok & Johnston 2001 (the values scikit-image and ImageJ use).
# H&E: Ruifrok & Johnston hematoxylin + eosin.
NAMED_STAINS: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
    "H-DAB": (
        ("hematoxylin", "dab", "residual"),
        np.array([[0.650, 0.704, 0.286], [0.268, 0.570, 0.776]]),
    ),
    "H&E": (
        ("hematoxylin", "eosin", "residual"),
        np.array([[0.644211, 0.716556, 0.266844], [0.092789, 0.954111, 0.283111]]),
    ),
}


class StainConfig(StrictModel):
    """Which stain matrix to use: a named one, custom vectors, or estimated (Macenko)."""

    name: Literal["H-DAB", "H&E", "custom", "macenko"] = "H-DAB"
    vectors: list[list[float]] | None = None  # for `custom`: 2 or 3 OD vectors (R, G, B)
    names: list[str] | None = None  # channel names for `custom`, e.g. [hematoxylin, dab]


class Stains:
    """A stain matrix: three unit OD row vectors and their names."""

    def __init__(self, vectors: np.ndarray, names: tuple[str, ...]) -> None:
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.shape not in ((2, 3), (3, 3)):
            raise ConfigError(f"stain vectors: expected 2 or 3 rows of 3, got {vectors.shape}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if np.any(norms <= 0):
            raise ConfigError("stain vectors: a vector is all zeros")
        vectors = vectors / norms
        if vectors.shape[0] == 2:
            third = np.cross(vectors[0], vectors[1])
            if np.linalg.norm(third) < 1e-6:
                raise ConfigError("stain vectors: the matrix is singular (vectors are parallel)")
            vectors = np.vstack([vectors, third / np.linalg.norm(third)])
        if abs(np.linalg.det(vectors)) < 1e-6:
            raise ConfigError("stain vectors: the matrix is singular (vectors are parallel)")
        names = tuple(names) + ("residual",) * (3 - len(names))
        self.vectors = vectors
        self.names = names[:3]
        self.inverse = np.linalg.inv(vectors)

    def index(self, name: str) -> int:
        """Channel index of a stain by name."""
        if name not in self.names:
            raise ConfigError(f"stain {name!r} not in {self.names}")
        return self.names.index(name)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "vectors": self.vectors.tolist()}


def named_stains(name: str) -> Stains:
    """The stain matrix called `name` ('H-DAB' or 'H&E')."""
    if name not in NAMED_STAINS:
        raise ConfigError(f"unknown stain matrix {name!r}; known: {sorted(NAMED_STAINS)}")
    names, vectors = NAMED_STAINS[name]
    return Stains(vectors, names)


def stains_from_config(cfg: StainConfig, rgb: np.ndarray | None = None) -> Stains:
    """Build the stain matrix a configuration asks for (`macenko` needs an image `rgb`)."""
    if cfg.name == "custom":
        if not cfg.vectors:
            raise ConfigError("stains.vectors: required when stains.name is 'custom'")
        names = tuple(cfg.names or ("stain1", "stain2", "residual"))
        return Stains(np.array(cfg.vectors), names)
    if cfg.name == "macenko":
        if rgb is None:
            raise ConfigError("stains.name 'macenko' needs an image to estimate vectors from")
        return macenko_stains(rgb)
    return named_stains(cfg.name)


def deconvolve(rgb: np.ndarray, stains: Stains | str = "H-DAB") -> np.ndarray:
    """OD contributed by each stain, float32 (H, W, 3) in the order of `stains.names`.

    Negative values (noise, or colour outside the stain model) are clipped to 0.
    """
    if isinstance(stains, str):
        stains = named_stains(stains)
    return np.maximum(unmix(optical_density(rgb), stains), 0)


def unmix(od: np.ndarray, stains: Stains) -> np.ndarray:
    """Per-pixel stain amounts (H, W, 3), unclipped, from OD (H, W, 3): ``od @ inverse``."""
    od = np.ascontiguousarray(od, dtype=np.float32)
    return cv2.transform(od, stains.inverse.T.astype(np.float32))


def dab_od(rgb: np.ndarray, residual_gate: float | None = RESIDUAL_GATE) -> np.ndarray:
    """DAB OD (H, W) float32 through the Ruifrok & Johnston H-DAB matrix (with residual).

    Colours the H-DAB model cannot explain are not DAB: eosin (pink) decomposes into
    hematoxylin + DAB with a strongly negative residual. With `residual_gate` set, a pixel whose
    residual OD is below ``-residual_gate * DAB OD`` gets DAB OD 0. Real DAB brown has a
    residual near 0 or positive, so this keeps an H&E section from looking DAB-positive.
    ``residual_gate=None`` gives the plain DAB channel.
    """
    return dab_od_from_od(optical_density(rgb), residual_gate)


def dab_od_from_od(od: np.ndarray, residual_gate: float | None = RESIDUAL_GATE) -> np.ndarray:
    """`dab_od` from an optical-density image already computed (H, W, 3)."""
    x = unmix(od, named_stains("H-DAB"))
    dab = np.maximum(x[..., 1], 0)
    if residual_gate is not None:
        dab[x[..., 2] < -residual_gate * dab] = 0
    return dab


def dab_positive(
    rgb: np.ndarray, threshold: float = 0.15, residual_gate: float | None = RESIDUAL_GATE
) -> np.ndarray:
    """Pixels whose (gated) DAB OD exceeds `threshold` OD, bool (H, W)."""
    return dab_od(rgb, residual_gate) > threshold


def dab_background(dab: np.ndarray, tissue: np.ndarray, floor: float) -> float:
    """Non-specific DAB OD of a slide: the median DAB OD of its clearly negative tissue.

    Tissue pixels are split in two by Otsu on their DAB OD, the split bounded below by `floor`
    (a slide with no positive class keeps all tissue below `floor` as negative); the median of
    the lower class is the background tint. 0 when there is too little tissue.
    """
    values = np.asarray(dab, np.float32)[np.asarray(tissue, bool)]
    if values.size < 100:
        return 0.0
    values = np.clip(values, 0, 2.0)
    u8 = np.round(values / 2.0 * 255).astype(np.uint8).reshape(-1, 1)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    split = max(float(otsu) / 255 * 2.0, floor)
    negative = values[values < split]
    return float(np.median(negative)) if negative.size else 0.0


def hematoxylin_od(rgb: np.ndarray, stains: Stains | str = "H-DAB") -> np.ndarray:
    """Hematoxylin OD (H, W) float32 (H-DAB matrix by default; pass 'H&E' for H&E slides)."""
    if isinstance(stains, str):
        stains = named_stains(stains)
    return deconvolve(rgb, stains)[..., stains.index("hematoxylin")]


def total_od(rgb: np.ndarray) -> np.ndarray:
    """Sum of the three channel ODs (H, W) float32: how much stain there is, of any colour."""
    return optical_density(rgb).sum(axis=-1)


def macenko_stains(rgb: np.ndarray, od_threshold: float = 0.15, alpha: float = 1.0) -> Stains:
    """Estimate two stain vectors (Macenko et al. 2009), ordered hematoxylin-like first."""
    od = optical_density(rgb).reshape(-1, 3).astype(np.float64)
    od = od[np.all(od > od_threshold, axis=1)]
    if len(od) < 100:
        raise ConfigError("macenko: too few stained pixels to estimate stain vectors")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = (v1 if v1[0] >= 0 else -v1), (v2 if v2[0] >= 0 else -v2)
    # hematoxylin absorbs most in red relative to blue: larger R/B first
    first, second = (v1, v2) if v1[0] / max(v1[2], 1e-6) > v2[0] / max(v2[2], 1e-6) else (v2, v1)
    return Stains(np.vstack([first, second]), ("hematoxylin", "stain2", "residual"))


def tissue_mask_od(rgb: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Pixels whose total OD exceeds `threshold` (bool (H, W)): stained tissue, not glass."""
    return total_od(rgb) > threshold
