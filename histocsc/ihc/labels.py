"""Per-tile IHC labels: the DAB-positive fraction of IHC tissue under each H&E tile.

The IHC region under the tiles is read once, in big row bands at `label_mpp`, and turned into
two maps: tissue (summed RGB optical density above `tissue_od_threshold`) and DAB-positive
tissue (DAB optical density above `dab_od_threshold`, raised per slide above its non-specific
background tint when `dab_background` is on: see `slide_dab_threshold`). Both maps are warped
into the H&E frame at `label_mpp` through the H&E -> IHC transform (a dense `cv2.remap`, band
by band), so every tile footprint, rigid or not, is measured with two box sums over integral
images: no IHC pixel is read twice, however much the tiles overlap.

All optical densities are base-10 (OD = -log10(I / I0)), as in QuPath.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histocsc.errors import LabelError
from histocsc.ihc.cell_labels import (
    CHUNK_PX,
    MARGIN_UM,
    TileCells,
    chunks_under_tiles,
    count_in_tiles,
    detect_slide_cells,
)
from histocsc.ihc.cells import classify, compartment_for
from histocsc.ihc.deconvolution import dab_background, dab_od_from_od, optical_density
from histocsc.ihc.label_config import CUTS, LabelConfig, MarkerThresholds
from histocsc.ihc.label_map import LABEL_COLOURS, write_label_map

__all__ = ["LABEL_COLOURS", "LabelConfig", "MarkerLabels", "MarkerThresholds", "label_slide",
           "write_label_map"]

PointMap = Callable[[np.ndarray], np.ndarray]
"""Maps (N, 2) level-0 (x, y) points of the H&E onto level-0 points of the IHC."""

BAND_ROWS = 2048  # output rows per IHC read / warp band
MAP_STEP = 4  # the transform is evaluated every MAP_STEP label pixels, bilinear in between
BACKGROUND_MPP_FACTOR = 2  # the background tint is estimated at this x label_mpp


@dataclass
class MarkerLabels:
    """Per tile: DAB-positive fraction of IHC tissue, IHC tissue fraction, label; with a cell
    rule (or `count_cells`) the tile's cell counts too."""

    fraction: np.ndarray  # float, NaN where the footprint holds no IHC tissue
    tissue: np.ndarray  # float in [0, 1]
    label: np.ndarray  # int8: 1 positive, 0 negative, -1 ignored
    dab_od_threshold: float | None = None  # the threshold used on this slide
    cells: TileCells | None = None  # per tile cell counts, when cells were detected
    cell_points: np.ndarray | None = None  # (N, 3): H&E level-0 x, y and class 0-3 per cell
    rule: str = "pixel_fraction"


def slide_dab_threshold(rgb: np.ndarray, cfg: LabelConfig) -> float:
    """The DAB OD threshold for a slide (RGB: a low-resolution view of its tissue).

    `cfg.dab_od_threshold`, raised to the slide's background tint (`dab_background`: median DAB
    OD of its clearly negative tissue) plus `dab_background_margin`, so a slide with a beige
    non-specific tint does not turn positive.
    """
    if not cfg.dab_background:
        return cfg.dab_od_threshold
    return max(cfg.dab_od_threshold, slide_background(rgb, cfg) + cfg.dab_background_margin)


def slide_background(rgb: np.ndarray, cfg: LabelConfig) -> float:
    """The slide's non-specific DAB OD: median DAB OD of its clearly negative tissue."""
    od = optical_density(rgb)
    tissue = od.sum(axis=-1) > cfg.tissue_od_threshold
    return dab_background(dab_od_from_od(od), tissue, cfg.dab_od_threshold)


def positive_fraction(rgb: np.ndarray, cfg: LabelConfig) -> float:
    """DAB-positive share of the tissue of one IHC image, with its own background estimate."""
    cfg = cfg.model_copy(update={"dab_od_threshold": slide_dab_threshold(rgb, cfg)})
    tissue, positive = stain_maps(rgb, cfg)
    return float(positive.sum() / max(1, tissue.sum()))


def stain_maps(rgb: np.ndarray, cfg: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and DAB-positive-tissue maps (uint8 0/1) of an IHC RGB image."""
    od = optical_density(rgb)  # once: both maps derive from it
    tissue = od.sum(axis=-1) > cfg.tissue_od_threshold
    positive = tissue & (dab_od_from_od(od) > cfg.dab_od_threshold)
    return tissue.astype(np.uint8), positive.astype(np.uint8)


@dataclass
class IhcMaps:
    """Tissue and DAB-positive-tissue maps (uint8 0/1) of an IHC region at about label_mpp.

    Map pixel (i, j) covers IHC level-0 x in [x0 + j / scale[0], x0 + (j + 1) / scale[0]) and
    likewise in y; `origin` = (x0, y0), `scale` = map px per IHC level-0 px in x and y.
    """

    tissue: np.ndarray
    positive: np.ndarray
    origin: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)


def footprint_region(
    tiles_xywh: np.ndarray, he_to_ihc: PointMap, ihc_size: tuple[int, int], margin: float
) -> tuple[int, int, int, int] | None:
    """IHC level-0 box (x, y, w, h) holding every tile's mapped footprint (+ margin), clipped to
    the slide; None when no footprint touches the slide. Footprints are sampled on their corners
    and edge midpoints."""
    xywh = np.asarray(tiles_xywh, dtype=np.float64).reshape(-1, 4)
    if not len(xywh):
        return None
    fx = np.array([0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0])
    fy = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
    pts = np.stack(
        [xywh[:, :1] + fx * xywh[:, 2:3], xywh[:, 1:2] + fy * xywh[:, 3:4]], axis=-1
    ).reshape(-1, 2)
    mapped = np.asarray(he_to_ihc(pts), dtype=np.float64)
    x0, y0 = np.floor(mapped.min(axis=0) - margin)
    x1, y1 = np.ceil(mapped.max(axis=0) + margin)
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    x1, y1 = min(ihc_size[0], int(x1)), min(ihc_size[1], int(y1))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def read_stain_maps(
    slide, cfg: LabelConfig, region: tuple[int, int, int, int] | None = None
) -> IhcMaps:
    """Read an IHC region (level-0 x, y, w, h; default whole slide) once at `cfg.label_mpp`,
    band by band, into tissue and DAB-positive maps."""
    x, y, w, h = region if region is not None else (0, 0, *slide.dimensions)
    step = cfg.label_mpp / slide.mpp  # level-0 px per label px
    # floor: the read is never finer than asked, so the slide can serve it from a coarser level
    out_w, out_h = max(1, int(w / step)), max(1, int(h / step))
    tissue = np.zeros((out_h, out_w), np.uint8)
    positive = np.zeros((out_h, out_w), np.uint8)
    for r0 in range(0, out_h, BAND_ROWS):
        r1 = min(out_h, r0 + BAND_ROWS)
        y0 = math.floor(r0 * h / out_h)
        y1 = min(h, math.ceil(r1 * h / out_h))
        rgb = slide.read(x, y + y0, w, max(1, y1 - y0), out_size=(out_w, r1 - r0))
        tissue[r0:r1], positive[r0:r1] = stain_maps(rgb, cfg)
    return IhcMaps(tissue, positive, (float(x), float(y)), (out_w / w, out_h / h))


def warp_to_he(
    maps: IhcMaps,
    he_to_ihc: PointMap,
    window: tuple[int, int, int, int],
    he_mpp: float,
    label_mpp: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and positive IHC maps warped into an H&E window (label px x, y, w, h), float32.

    H&E label pixel (i, j) covers level-0 [j * s, (j + 1) * s) with s = label_mpp / he_mpp. Each
    output pixel is the bilinear value of the IHC map at the point the transform sends its
    centre to; outside the mapped IHC region the value is 0. The transform is evaluated every
    MAP_STEP px and interpolated bilinearly in between.
    """
    wx, wy, out_w, out_h = window
    srcs = [maps.tissue.astype(np.float32), maps.positive.astype(np.float32)]
    outs = [np.zeros((out_h, out_w), np.float32) for _ in srcs]
    he_scale = label_mpp / he_mpp  # H&E level-0 px per label px
    for r0 in range(0, out_h, BAND_ROWS):
        r1 = min(out_h, r0 + BAND_ROWS)
        nodes_x = np.arange(0, out_w + MAP_STEP, MAP_STEP, dtype=np.float64)
        nodes_y = np.arange(r0, r1 + MAP_STEP, MAP_STEP, dtype=np.float64)
        gx, gy = np.meshgrid(nodes_x + wx + 0.5, nodes_y + wy + 0.5)
        he_pts = np.stack([gx.ravel() * he_scale, gy.ravel() * he_scale], axis=1)
        ihc_pts = np.asarray(he_to_ihc(he_pts), dtype=np.float64).reshape(gx.shape + (2,))
        coarse_x = ((ihc_pts[..., 0] - maps.origin[0]) * maps.scale[0] - 0.5).astype(np.float32)
        coarse_y = ((ihc_pts[..., 1] - maps.origin[1]) * maps.scale[1] - 0.5).astype(np.float32)
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
    return outs[0], outs[1]


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
    he_mpp: float,
    maps: IhcMaps,
    he_to_ihc: PointMap,
    cfg: LabelConfig,
) -> MarkerLabels:
    """Label H&E tiles (level-0 x, y, w, h rows) from IHC maps: the maps are warped once into
    the H&E window covering all tiles, then each tile is two box sums."""
    xywh = np.asarray(tiles_xywh, dtype=np.float64).reshape(-1, 4)
    if not len(xywh):
        return MarkerLabels(np.zeros(0), np.zeros(0), np.zeros(0, np.int8))
    scale = he_mpp / cfg.label_mpp  # label px per H&E level-0 px
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = np.rint(corners * scale).astype(np.int64)
    wx, wy = boxes[:, :2].min(axis=0)
    boxes -= np.array([wx, wy, wx, wy])
    width, height = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    # bands of rows, so memory stays bounded on big slides; each tile is measured in the band
    # holding its top row, and bands overlap by one tile height so it fits whole
    tile_h = int((boxes[:, 3] - boxes[:, 1]).max())
    step = max(BAND_ROWS, tile_h)
    tissue_sum = np.zeros(len(boxes))
    positive_sum = np.zeros(len(boxes))
    for b0 in range(0, height, step):
        sel = (boxes[:, 1] >= b0) & (boxes[:, 1] < b0 + step)
        if not sel.any():
            continue
        b1 = int(boxes[sel, 3].max())
        window = (int(wx), int(wy) + b0, width, b1 - b0)
        tissue_he, positive_he = warp_to_he(maps, he_to_ihc, window, he_mpp, cfg.label_mpp)
        band_boxes = boxes[sel] - np.array([0, b0, 0, b0])
        tissue_sum[sel] = box_sums(tissue_he, band_boxes)
        positive_sum[sel] = box_sums(positive_he, band_boxes)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(tissue_sum > 1e-6, positive_sum / tissue_sum, np.nan)
    tissue = np.clip(tissue_sum / area, 0.0, 1.0)
    return MarkerLabels(fraction=fraction, tissue=tissue, label=to_labels(fraction, tissue, cfg))


def label_slide(
    tiles_xywh: np.ndarray,
    he_mpp: float,
    ihc_path: str | Path,
    he_to_ihc: PointMap,
    cfg: LabelConfig,
    ihc_mpp: float | None = None,
    ihc_to_he: PointMap | None = None,
    marker: str = "",
) -> MarkerLabels:
    """Label every H&E tile from one IHC slide, reading the IHC under the tiles once
    (`ihc_mpp`: its pixel size when the file records none). A cell rule (or `count_cells`)
    also detects the cells under the tiles, which needs `ihc_to_he`; `marker` picks the
    compartment preset."""
    from histocsc.wsi.slide import open_slide

    if not len(tiles_xywh):
        return MarkerLabels(np.zeros(0), np.zeros(0), np.zeros(0, np.int8))
    with open_slide(ihc_path, fallback_mpp=ihc_mpp) as slide:
        margin = 4 * cfg.label_mpp / slide.mpp
        region = footprint_region(tiles_xywh, he_to_ihc, slide.dimensions, margin)
        if region is None:
            raise LabelError(f"{ihc_path}: the H&E tiles map outside the IHC slide")
        x, y, w, h = region
        view = slide.read(x, y, w, h, max(slide.mpp, BACKGROUND_MPP_FACTOR * cfg.label_mpp))
        background = slide_background(view, cfg) if cfg.dab_background else 0.0
        threshold = slide_dab_threshold(view, cfg)
        cfg = cfg.model_copy(update={"dab_od_threshold": threshold})
        maps = read_stain_maps(slide, cfg, region)
        ihc_slide_mpp = slide.mpp
    if not maps.tissue.any():
        raise LabelError(
            f"{ihc_path}: no tissue found under the H&E tiles at {cfg.label_mpp} µm/px"
        )
    result = measure_tiles(tiles_xywh, he_mpp, maps, he_to_ihc, cfg)
    result.dab_od_threshold = threshold
    if cfg.wants_cells():
        if ihc_to_he is None:
            raise LabelError(f"{ihc_path}: cell labels need the IHC -> H&E transform")
        cells_under_tiles(result, tiles_xywh, ihc_path, ihc_slide_mpp, ihc_mpp, maps, region,
                          (he_to_ihc, ihc_to_he), cfg, marker, max(0.0, background))
    result.rule = cfg.rule
    result.label = rule_labels(result, cfg)
    return result


def cells_under_tiles(
    result: MarkerLabels, tiles_xywh: np.ndarray, ihc_path, ihc_slide_mpp: float,
    ihc_mpp: float | None, maps: IhcMaps, region: tuple[int, int, int, int],
    transforms: tuple[PointMap, PointMap], cfg: LabelConfig, marker: str, dab_offset: float,
) -> None:
    """Detect the IHC cells under the tiles and count them per tile (into `result`, in place).

    `dab_offset`: the slide's non-specific DAB tint, subtracted from every cell's DAB OD."""
    he_to_ihc, ihc_to_he = transforms
    xywh = np.asarray(tiles_xywh, np.float64).reshape(-1, 4)
    centres = he_to_ihc(xywh[:, :2] + xywh[:, 2:] / 2)
    reach = 0.75 * float(np.hypot(*xywh[:, 2:].max(axis=0)))  # half diagonal and slack
    step = CHUNK_PX * max(cfg.cells.cell_mpp, ihc_slide_mpp) / ihc_slide_mpp
    margin = (MARGIN_UM + cfg.cells.cell_expansion_um) / ihc_slide_mpp

    def has_tissue(x0: int, y0: int, x1: int, y1: int) -> bool:
        ox, oy = maps.origin
        sx, sy = maps.scale
        j0, i0 = int((x0 - ox) * sx), int((y0 - oy) * sy)
        j1, i1 = int(math.ceil((x1 - ox) * sx)), int(math.ceil((y1 - oy) * sy))
        return bool(maps.tissue[max(0, i0) : i1, max(0, j0) : j1].any())

    chunks = chunks_under_tiles(region, centres, reach, step, margin, has_tissue)
    compartment = compartment_for(marker, cfg.compartment)
    cells = detect_slide_cells(ihc_path, ihc_mpp, chunks, cfg.cells, compartment == "nuclear",
                               dab_offset, cfg.cell_workers)
    classes = classify(cells, compartment, cfg.cells)
    he_xy = np.asarray(ihc_to_he(np.column_stack([cells.x, cells.y])), np.float64)
    he_xy = he_xy.reshape(-1, 2)
    result.cells = count_in_tiles(tiles_xywh, he_xy[:, 0], he_xy[:, 1], classes)
    result.cell_points = np.column_stack([he_xy, classes]).astype(np.float32)


def rule_labels(result: MarkerLabels, cfg: LabelConfig) -> np.ndarray:
    """Labels by the configured rule: pixel fraction, share of positive cells, or H-score."""
    if cfg.rule == "pixel_fraction" or result.cells is None:
        return to_labels(result.fraction, result.tissue, cfg)
    value = result.cells.positive_fraction if cfg.rule == "positive_cells" else result.cells.hscore
    low, high = (getattr(cfg, name) for name in CUTS[cfg.rule])
    label = np.full(value.shape, -1, np.int8)
    valid = (result.tissue >= cfg.min_tissue_fraction) & (result.cells.cells >= cfg.min_cells)
    valid &= np.isfinite(value)
    label[valid & (value >= high)] = 1
    label[valid & (value <= low)] = 0
    return label
