"""Per-tile IHC labels: the DAB-positive fraction of IHC tissue under each H&E tile.

Each IHC slide is read once, in big row bands at `label_mpp`, and turned into two maps: tissue
(total optical density above a threshold) and DAB-positive tissue (DAB optical density above
`dab_od_threshold`). Both maps are warped once into the H&E frame at `label_mpp` through the
H&E -> IHC transform (a dense `cv2.remap`), so every tile footprint, rigid or not, is measured
with box sums over integral images: no IHC pixel is read twice.

All optical densities are base-10 (OD = -log10(I / I0)), as in QuPath.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydantic import Field, model_validator

from histocsc.config import StrictModel
from histocsc.errors import LabelError
from histocsc.ihc.deconvolution import dab_od, tissue_mask_od
from histocsc.io import atomic_path

PointMap = Callable[[np.ndarray], np.ndarray]
"""Maps (N, 2) level-0 (x, y) points of the H&E onto level-0 points of the IHC."""

BAND_ROWS = 2048  # output rows per IHC read / warp band
MAP_STEP = 4  # the transform is evaluated every MAP_STEP label pixels, bilinear in between


class LabelConfig(StrictModel):
    """How IHC stain becomes a tile label. Optical densities are base-10 OD units."""

    markers: list[str] | None = Field(
        None, description="markers to label; None = every marker column of the cohort"
    )
    label_mpp: float = Field(2.0, gt=0, description="µm/px at which the IHC is measured")
    dab_od_threshold: float = Field(
        0.1, ge=0, description="DAB optical density (base-10 OD) above which a pixel is positive"
    )
    tissue_od_threshold: float = Field(
        0.15, ge=0, description="summed RGB optical density (base-10 OD) above which it is tissue"
    )
    positive_fraction: float = Field(
        0.3, ge=0, le=1, description="tile label 1 when the DAB-positive tissue fraction >= this"
    )
    negative_fraction: float = Field(
        0.2, ge=0, le=1, description="tile label 0 when the DAB-positive tissue fraction <= this"
    )
    min_tissue_fraction: float = Field(
        0.2, ge=0, le=1, description="tiles whose IHC footprint holds less tissue are ignored (-1)"
    )
    max_registration_error_um: float = Field(
        25.0, gt=0, description="a marker whose registration error estimate exceeds this is flagged"
    )
    label_map_max_px: int = Field(2048, ge=64, description="longest side of label_map_<M>.png")

    @model_validator(mode="after")
    def _band(self) -> LabelConfig:
        if self.negative_fraction >= self.positive_fraction:
            raise ValueError(
                f"negative_fraction ({self.negative_fraction}) must be below "
                f"positive_fraction ({self.positive_fraction})"
            )
        return self


@dataclass
class MarkerLabels:
    """Per tile: DAB-positive fraction of IHC tissue, IHC tissue fraction, label."""

    fraction: np.ndarray  # float, NaN where the footprint holds no IHC tissue
    tissue: np.ndarray  # float in [0, 1]
    label: np.ndarray  # int8: 1 positive, 0 negative, -1 ignored


def stain_maps(rgb: np.ndarray, cfg: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and DAB-positive-tissue maps (uint8 0/1) of an IHC RGB image."""
    tissue = tissue_mask_od(rgb, cfg.tissue_od_threshold)
    positive = tissue & (dab_od(rgb) > cfg.dab_od_threshold)
    return tissue.astype(np.uint8), positive.astype(np.uint8)


def read_stain_maps(slide, cfg: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Read an IHC slide once at `cfg.label_mpp`, band by band, into tissue and positive maps."""
    width, height = slide.dimensions
    scale = cfg.label_mpp / slide.mpp  # level-0 px per label px
    out_w, out_h = max(1, round(width / scale)), max(1, round(height / scale))
    tissue = np.zeros((out_h, out_w), np.uint8)
    positive = np.zeros((out_h, out_w), np.uint8)
    for r0 in range(0, out_h, BAND_ROWS):
        r1 = min(out_h, r0 + BAND_ROWS)
        y0 = round(r0 * scale)
        y1 = height if r1 == out_h else round(r1 * scale)
        rgb = slide.read(0, y0, width, max(1, y1 - y0), out_size=(out_w, r1 - r0))
        tissue[r0:r1], positive[r0:r1] = stain_maps(rgb, cfg)
    return tissue, positive


def warp_to_he(
    maps: list[np.ndarray],
    he_to_ihc: PointMap,
    he_shape: tuple[int, int],
    he_mpp: float,
    ihc_mpp: float,
    label_mpp: float,
) -> list[np.ndarray]:
    """Warp IHC maps (at label_mpp) into the H&E frame (at label_mpp, shape (H, W)), float32.

    Each output pixel is the bilinear value of the IHC map at the IHC point the transform sends
    that H&E pixel to; outside the IHC the value is 0.
    """
    out_h, out_w = he_shape
    outs = [np.zeros((out_h, out_w), np.float32) for _ in maps]
    srcs = [m.astype(np.float32) for m in maps]
    he_scale = label_mpp / he_mpp  # H&E level-0 px per label px
    ihc_scale = ihc_mpp / label_mpp  # IHC label px per IHC level-0 px
    for r0 in range(0, out_h, BAND_ROWS):
        r1 = min(out_h, r0 + BAND_ROWS)
        # the transform on a coarse grid of nodes (every MAP_STEP px, covering the band) ...
        nodes_x = np.arange(0, out_w + MAP_STEP, MAP_STEP, dtype=np.float64)
        nodes_y = np.arange(r0, r1 + MAP_STEP, MAP_STEP, dtype=np.float64)
        gx, gy = np.meshgrid(nodes_x, nodes_y)
        he_pts = np.stack([(gx.ravel() + 0.5) * he_scale, (gy.ravel() + 0.5) * he_scale], axis=1)
        ihc_pts = np.asarray(he_to_ihc(he_pts), dtype=np.float64).reshape(gx.shape + (2,))
        coarse_x = (ihc_pts[..., 0] * ihc_scale - 0.5).astype(np.float32)
        coarse_y = (ihc_pts[..., 1] * ihc_scale - 0.5).astype(np.float32)
        # ... interpolated bilinearly to every pixel of the band
        fx, fy = np.meshgrid(
            np.arange(out_w, dtype=np.float32) / MAP_STEP,
            np.arange(r1 - r0, dtype=np.float32) / MAP_STEP,
        )
        map_x = cv2.remap(coarse_x, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        map_y = cv2.remap(coarse_y, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        for src, out in zip(srcs, outs, strict=True):
            out[r0:r1] = cv2.remap(
                src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
    return outs


def box_sums(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Sum of `image` inside each (x0, y0, x1, y1) integer box (clipped), via an integral image."""
    integral = cv2.integral(image, sdepth=cv2.CV_64F)
    h, w = image.shape
    x0 = np.clip(boxes[:, 0], 0, w)
    y0 = np.clip(boxes[:, 1], 0, h)
    x1 = np.clip(boxes[:, 2], 0, w)
    y1 = np.clip(boxes[:, 3], 0, h)
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def to_labels(fraction: np.ndarray, tissue: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """1 where fraction >= positive_fraction, 0 where <= negative_fraction, else -1 (ignored)."""
    label = np.full(fraction.shape, -1, np.int8)
    valid = (tissue >= cfg.min_tissue_fraction) & np.isfinite(fraction)
    label[valid & (fraction >= cfg.positive_fraction)] = 1
    label[valid & (fraction <= cfg.negative_fraction)] = 0
    return label


def measure_tiles(
    tiles_xywh: np.ndarray,
    he_size: tuple[int, int],
    he_mpp: float,
    ihc_maps: tuple[np.ndarray, np.ndarray],
    ihc_mpp: float,
    he_to_ihc: PointMap,
    cfg: LabelConfig,
) -> MarkerLabels:
    """Label H&E tiles (level-0 x, y, w, h rows) from IHC (tissue, positive) maps at label_mpp."""
    he_w, he_h = he_size
    scale = he_mpp / cfg.label_mpp  # label px per H&E level-0 px
    shape = (max(1, round(he_h * scale)), max(1, round(he_w * scale)))
    tissue_he, positive_he = warp_to_he(
        list(ihc_maps), he_to_ihc, shape, he_mpp, ihc_mpp, cfg.label_mpp
    )
    xywh = np.asarray(tiles_xywh, dtype=np.float64).reshape(-1, 4)
    boxes = np.rint(
        np.stack([xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]], axis=1)
        * scale
    ).astype(np.int64)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    tissue_sum = box_sums(tissue_he, boxes)
    positive_sum = box_sums(positive_he, boxes)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(tissue_sum > 1e-6, positive_sum / tissue_sum, np.nan)
    tissue = np.clip(tissue_sum / area, 0.0, 1.0)
    return MarkerLabels(fraction=fraction, tissue=tissue, label=to_labels(fraction, tissue, cfg))


def label_slide(
    tiles_xywh: np.ndarray,
    he_size: tuple[int, int],
    he_mpp: float,
    ihc_path: str | Path,
    he_to_ihc: PointMap,
    cfg: LabelConfig,
) -> MarkerLabels:
    """Read one IHC slide once and label every H&E tile from it."""
    from histocsc.wsi.slide import open_slide

    with open_slide(ihc_path) as slide:
        maps = read_stain_maps(slide, cfg)
        ihc_mpp = slide.mpp
    if not maps[0].any():
        raise LabelError(f"{ihc_path}: no tissue found in the IHC slide at {cfg.label_mpp} µm/px")
    return measure_tiles(tiles_xywh, he_size, he_mpp, maps, ihc_mpp, he_to_ihc, cfg)


LABEL_COLOURS = {1: (220, 30, 30), 0: (30, 180, 60), -1: (150, 150, 150)}


def write_label_map(
    path: str | Path,
    thumbnail: np.ndarray,
    thumb_scale: float,
    tiles_xywh: np.ndarray,
    label: np.ndarray,
    alpha: float = 0.45,
) -> None:
    """PNG of the H&E thumbnail with tiles painted: red positive, green negative, grey ignored.

    `thumb_scale` is thumbnail px per H&E level-0 px.
    """
    from PIL import Image

    colour = np.zeros(thumbnail.shape, np.uint8)
    painted = np.zeros(thumbnail.shape[:2], bool)
    xywh = np.asarray(tiles_xywh, dtype=np.float64).reshape(-1, 4)
    boxes = np.rint(
        np.stack([xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]], 1)
        * thumb_scale
    ).astype(np.int64)
    for value in (-1, 0, 1):  # positives painted last, on top where tiles overlap
        for x0, y0, x1, y1 in boxes[label == value]:
            colour[y0:y1, x0:x1] = LABEL_COLOURS[value]
            painted[y0:y1, x0:x1] = True
    out = thumbnail.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colour[painted]
    with atomic_path(path) as tmp:
        Image.fromarray(out.round().astype(np.uint8)).save(tmp, format="PNG")
