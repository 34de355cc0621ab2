"""Cell detection on an IHC image, the classical way QuPath's positive cell detection does it.

1. Colour deconvolution (Ruifrok & Johnston H-DAB): hematoxylin and DAB optical density.
2. Nuclei: the detection channel (hematoxylin OD, plus DAB OD for a nuclear marker, whose
   positive nuclei are brown rather than blue), Gaussian-smoothed (`sigma_um`), minus its
   background (a grey opening of radius `background_radius_um`), thresholded at
   `nucleus_od_threshold`.
3. Touching nuclei split by a watershed on the distance transform (scikit-image), seeded at its
   maxima at least `split_um` apart; nuclei outside [`min_area_um2`, `max_area_um2`] dropped.
4. The cell: each nucleus expanded by `cell_expansion_um` (skimage.segmentation.expand_labels,
   QuPath's default 5 µm), never into another cell.
5. Per cell, mean DAB OD of the nucleus, the cytoplasm (cell minus nucleus) and the membrane
   (the cell's boundary band, `membrane_um` wide), in one pass (np.bincount over the labels).

`classify` turns the compartment's DAB OD into 0 / 1+ / 2+ / 3+ with the 1+ / 2+ / 3+
thresholds (QuPath: 0.2 / 0.4 / 0.6 OD); positive is 1+ or more. All optical densities are
base-10, as in QuPath.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, field_validator
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.morphology import remove_small_holes
from skimage.segmentation import expand_labels, watershed

from histocsc.config import StrictModel
from histocsc.ihc.deconvolution import named_stains, unmix
from histocsc.wsi.optical_density import optical_density

Compartment = Literal["nuclear", "cytoplasm", "membrane"]
COMPARTMENTS: tuple[str, ...] = ("nuclear", "cytoplasm", "membrane")
# Compartment of the markers people pair with H&E (used when a marker's rule names none).
MARKER_COMPARTMENTS: dict[str, str] = {
    "CD44": "membrane", "CD133": "membrane", "CD31": "membrane", "HER2": "membrane",
    "Ki67": "nuclear", "ER": "nuclear", "PR": "nuclear", "p53": "nuclear",
    "pan-CK": "cytoplasm", "PanCytokeratin": "cytoplasm", "CC10": "cytoplasm",
    "proSPC": "cytoplasm",
}


class CellConfig(StrictModel):
    """Cell detection (sizes in µm, optical densities base-10 OD), QuPath's defaults."""

    cell_mpp: float = Field(0.5, gt=0, description="µm/px at which cells are detected")
    nucleus_od_threshold: float = Field(0.1, ge=0, description="nucleus: detection OD above")
    sigma_um: float = Field(0.25, ge=0, description="Gaussian smoothing of the detection image")
    background_radius_um: float = Field(8.0, ge=0, description="opening radius; 0: none")
    split_um: float = Field(1.0, gt=0, description="watershed seeds at least this far apart")
    min_area_um2: float = Field(10.0, ge=0, description="smaller nuclei are dropped")
    max_area_um2: float = Field(400.0, gt=0, description="larger nuclei are dropped")
    cell_expansion_um: float = Field(5.0, ge=0, description="cell = nucleus grown by this")
    membrane_um: float = Field(1.0, gt=0, description="width of the cell-boundary band")
    thresholds: tuple[float, float, float] = Field(
        (0.2, 0.4, 0.6), description="1+ / 2+ / 3+ DAB OD of the compartment"
    )

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not v[0] <= v[1] <= v[2]:
            raise ValueError(f"thresholds must be ascending (1+ <= 2+ <= 3+), got {v}")
        return v


@dataclass
class Cells:
    """Detected cells: per-cell arrays (x, y in the image's px, or level-0 after `shifted`)."""

    x: np.ndarray
    y: np.ndarray
    area_um2: np.ndarray  # nucleus area
    dab: dict[str, np.ndarray]  # mean DAB OD per compartment name

    def __len__(self) -> int:
        return len(self.x)

    @staticmethod
    def empty() -> Cells:
        z = np.zeros(0)
        return Cells(z, z.copy(), z.copy(), {c: z.copy() for c in COMPARTMENTS})

    def select(self, keep: np.ndarray) -> Cells:
        return Cells(self.x[keep], self.y[keep], self.area_um2[keep],
                     {k: v[keep] for k, v in self.dab.items()})

    @staticmethod
    def concat(parts: list[Cells]) -> Cells:
        if not parts:
            return Cells.empty()
        return Cells(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                     np.concatenate([p.area_um2 for p in parts]),
                     {c: np.concatenate([p.dab[c] for p in parts]) for c in COMPARTMENTS})


def stain_channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and DAB OD (H, W) float32, clipped at 0, through the H-DAB matrix."""
    x = unmix(optical_density(rgb), named_stains("H-DAB"))
    return np.maximum(x[..., 0], 0), np.maximum(x[..., 1], 0)


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def segment(
    rgb: np.ndarray, mpp: float, cfg: CellConfig, nuclear: bool = False,
    dab_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nucleus labels, cell labels, DAB OD) of an IHC RGB image at `mpp` µm/px.

    `nuclear`: the detection image adds the DAB OD (positive nuclei of a nuclear marker).
    `dab_offset`: the slide's non-specific DAB tint, subtracted from the DAB OD returned.
    """
    hema, dab = stain_channels(rgb)
    dab = np.maximum(dab - dab_offset, 0)
    det = hema + dab if nuclear else hema
    if cfg.sigma_um > 0:
        det = cv2.GaussianBlur(det, (0, 0), cfg.sigma_um / mpp)
    if cfg.background_radius_um > 0:
        det = det - cv2.morphologyEx(det, cv2.MORPH_OPEN, _disk(cfg.background_radius_um / mpp))
    mask = det > cfg.nucleus_od_threshold
    # holes smaller than a nucleus only: filling the gaps inside a ring of nuclei would merge them
    mask = remove_small_holes(mask, max_size=max(1, int(cfg.min_area_um2 / (mpp * mpp))))
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    dist = cv2.GaussianBlur(dist, (0, 0), 0.5)
    comps, _ = ndi.label(mask)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(cfg.split_um / mpp))), threshold_abs=0.5,
        labels=comps, exclude_border=False,
    )
    seeds = np.zeros(mask.shape, np.int32)
    seeds[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    nuclei = watershed(-dist, seeds, mask=mask)
    area = np.bincount(nuclei.ravel(), minlength=len(peaks) + 1) * mpp * mpp
    bad = (area < cfg.min_area_um2) | (area > cfg.max_area_um2)
    bad[0] = True
    nuclei[bad[nuclei]] = 0
    cells = expand_labels(nuclei, distance=cfg.cell_expansion_um / mpp)
    return nuclei, cells, dab


def measure(
    nuclei: np.ndarray, cells: np.ndarray, dab: np.ndarray, mpp: float, cfg: CellConfig
) -> Cells:
    """Centroid, nucleus area and mean DAB OD per compartment of every labelled cell."""
    n = int(cells.max()) + 1 if cells.size else 1
    flat_c = cells.ravel()
    d = dab.ravel().astype(np.float64)

    def means(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = np.bincount(labels, minlength=n).astype(np.float64)
        total = np.bincount(labels, weights=d, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count, count

    nuc_mean, nuc_count = means(nuclei.ravel())
    cyto = np.where(nuclei.ravel() > 0, 0, flat_c)
    cyto_mean, cyto_count = means(cyto)
    c32 = cells.astype(np.float32)
    k = _disk(cfg.membrane_um / mpp / 2)
    edge = (cv2.erode(c32, k) != c32) | (cv2.dilate(c32, k) != c32)
    memb_mean, memb_count = means(np.where(edge.ravel(), flat_c, 0))
    ids = np.nonzero(nuc_count[1:] > 0)[0] + 1
    if not len(ids):
        return Cells.empty()
    yy, xx = np.indices(nuclei.shape)
    sx = np.bincount(nuclei.ravel(), weights=xx.ravel(), minlength=n)
    sy = np.bincount(nuclei.ravel(), weights=yy.ravel(), minlength=n)
    cnt = nuc_count[ids]
    # a cell with no cytoplasm or membrane pixels (all nucleus) reads its nucleus there
    cyto_v = np.where(cyto_count[ids] > 0, cyto_mean[ids], nuc_mean[ids])
    memb_v = np.where(memb_count[ids] > 0, memb_mean[ids], cyto_v)
    return Cells(
        x=sx[ids] / cnt + 0.5, y=sy[ids] / cnt + 0.5, area_um2=cnt * mpp * mpp,
        dab={"nuclear": nuc_mean[ids], "cytoplasm": cyto_v, "membrane": memb_v},
    )


def detect_cells(
    rgb: np.ndarray, mpp: float, cfg: CellConfig | None = None, nuclear: bool = False,
    dab_offset: float = 0.0,
) -> Cells:
    """Cells of an IHC RGB image at `mpp` µm/px (x, y: continuous px of the image)."""
    cfg = cfg or CellConfig()
    nuclei, cells, dab = segment(rgb, mpp, cfg, nuclear, dab_offset)
    return measure(nuclei, cells, dab, mpp, cfg)


def classify(cells: Cells, compartment: str, cfg: CellConfig) -> np.ndarray:
    """0 / 1 / 2 / 3 (negative, 1+, 2+, 3+) per cell from its compartment's DAB OD."""
    value = np.nan_to_num(cells.dab[compartment], nan=0.0)
    return np.searchsorted(np.asarray(cfg.thresholds), value, side="right").astype(np.int8)


def hscore(classes: np.ndarray) -> float:
    """H-score (0-300): 1 x %1+ + 2 x %2+ + 3 x %3+; NaN with no cells."""
    if not len(classes):
        return float("nan")
    return float(100.0 * np.asarray(classes, np.float64).sum() / len(classes))


def compartment_for(marker: str, compartment: str | None) -> str:
    """The configured compartment, else the marker's preset, else membrane."""
    if compartment is not None:
        return compartment
    return MARKER_COMPARTMENTS.get(marker, MARKER_COMPARTMENTS.get(marker.upper(), "membrane"))
