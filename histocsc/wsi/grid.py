"""The tile grid: which square tiles of a slide are cut, in level-0 pixels, and how much tissue
each holds. Saved per slide as `grid.csv` (one row a tile) and a `grid.json` sidecar.

Geometry: a tile is `tile_px` pixels at `mpp`, i.e. `size0 = round(tile_px * mpp / slide_mpp)`
level-0 pixels; tiles start at (0, 0) and step by `stride0 = round(stride_px * mpp / slide_mpp)`.
Only whole tiles inside the slide are kept: a right or bottom margin narrower than a tile is not
tiled (it is never padded). A tile is kept when its tissue fraction, measured on the tissue mask
of the slide thumbnail, is at least `min_tissue_fraction`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from histocsc import __version__
from histocsc.config import StrictModel
from histocsc.errors import DataError, DataNotFoundError, SlideError
from histocsc.io import atomic_path, read_json, write_json
from histocsc.wsi.slide import Slide
from histocsc.wsi.tissue import TissueConfig, tissue_mask

GRID_CSV = "grid.csv"
GRID_JSON = "grid.json"
COLUMNS = ("x", "y", "w", "h", "tissue_fraction")
FORMAT = "histocsc-tile-grid/1"


class TilesConfig(StrictModel):
    """Parameters of the tile grid (and of `histocsc tiles`)."""

    tile_px: int = Field(224, ge=8, description="tile side in pixels at `mpp`")
    mpp: float = Field(0.5, gt=0, description="resolution of the tiles, µm per pixel")
    stride_px: int | None = Field(None, ge=1, description="step between tiles at `mpp`")
    overlap_px: int = Field(0, ge=0, description="overlap of neighbours; ignored with stride_px")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1, description="keep tiles at least this")
    tissue: TissueConfig = Field(default_factory=TissueConfig)

    @model_validator(mode="after")
    def _overlap_smaller_than_tile(self) -> TilesConfig:
        if self.stride_px is None and self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be below tile_px")
        return self

    @property
    def stride(self) -> int:
        """Step between tiles in pixels at `mpp`."""
        return self.stride_px if self.stride_px is not None else self.tile_px - self.overlap_px


@dataclasses.dataclass
class TileGrid:
    """Tiles of one slide. `table` columns: x, y, w, h (int64, level-0 px), tissue_fraction."""

    slide_path: str
    slide_mpp: float
    slide_width: int
    slide_height: int
    mpp: float
    tile_px: int
    stride_px: int
    params: dict[str, Any]
    table: dict[str, np.ndarray]
    slide_checksum: str = ""

    def __len__(self) -> int:
        return len(self.table["x"])

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) int64 array of x, y, w, h."""
        return np.stack([self.table[c] for c in ("x", "y", "w", "h")], axis=1).reshape(-1, 4)

    def meta(self) -> dict[str, Any]:
        """The JSON sidecar content."""
        return {
            "format": FORMAT,
            "histocsc_version": __version__,
            "slide_path": self.slide_path,
            "slide_checksum": self.slide_checksum,
            "slide_width": self.slide_width,
            "slide_height": self.slide_height,
            "slide_mpp": self.slide_mpp,
            "mpp": self.mpp,
            "tile_px": self.tile_px,
            "stride_px": self.stride_px,
            "n_tiles": len(self),
            "params": self.params,
        }

    def save(self, folder: str | Path) -> None:
        """Write `grid.csv`, then `grid.json` (the sidecar last: it marks a finished grid)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / GRID_CSV) as tmp, tmp.open("w") as f:
            f.write(",".join(COLUMNS) + "\n")
            rows = zip(*(self.table[c] for c in COLUMNS), strict=True)
            f.writelines(f"{x},{y},{w},{h},{t:.4f}\n" for x, y, w, h, t in rows)
        write_json(folder / GRID_JSON, self.meta())

    @classmethod
    def load(cls, folder: str | Path) -> TileGrid:
        """Read a grid saved by `save`; a DataError names the file when it is missing or bad."""
        folder = Path(folder)
        meta_path, csv_path = folder / GRID_JSON, folder / GRID_CSV
        for path in (meta_path, csv_path):
            if not path.is_file():
                raise DataNotFoundError(f"{path}: tile grid file not found")
        try:
            meta = read_json(meta_path)
            fields = {
                k: meta[k]
                for k in (
                    "slide_path",
                    "slide_mpp",
                    "slide_width",
                    "slide_height",
                    "mpp",
                    "tile_px",
                    "stride_px",
                    "params",
                )
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path}: not a tile grid sidecar ({exc})") from None
        with csv_path.open() as f:
            header = f.readline().strip()
        if header != ",".join(COLUMNS):
            raise DataError(f"{csv_path}: expected header {','.join(COLUMNS)!r}, got {header!r}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a grid with no tiles is valid
                data = np.loadtxt(csv_path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{csv_path}: malformed row ({exc})") from None
        data = data.reshape(-1, len(COLUMNS))
        table = {c: data[:, i].astype(np.int64) for i, c in enumerate(COLUMNS[:4])}
        table["tissue_fraction"] = data[:, 4].astype(np.float32)
        if "n_tiles" in meta and meta["n_tiles"] != len(data):
            raise DataError(
                f"{csv_path}: {len(data)} rows but {meta_path.name} says "
                f"{meta['n_tiles']} (interrupted or edited)"
            )
        return cls(**fields, table=table, slide_checksum=meta.get("slide_checksum", ""))


def tile_geometry(slide_mpp: float, tile_px: int, mpp: float, stride_px: int) -> tuple[int, int]:
    """Tile side and stride in level-0 pixels."""
    size0 = round(tile_px * mpp / slide_mpp)
    stride0 = round(stride_px * mpp / slide_mpp)
    if size0 < 1 or stride0 < 1:
        raise SlideError(f"tile of {tile_px} px at {mpp} µm/px is below one slide pixel")
    return size0, stride0


def tile_positions(width: int, height: int, size0: int, stride0: int) -> np.ndarray:
    """(N, 2) x, y of every whole tile inside a width x height slide, row by row."""
    xs = np.arange(0, width - size0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, stride0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def mask_fractions(mask: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exact area fraction of each level-0 box (x, y, w, h) covered by `mask`, a whole-slide mask
    at any resolution (pixels partly inside a box count by the part inside)."""
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    mh, mw = mask.shape
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    u0 = np.clip(boxes[:, 0] * (mw / width), 0, mw)
    v0 = np.clip(boxes[:, 1] * (mh / height), 0, mh)
    u1 = np.clip((boxes[:, 0] + boxes[:, 2]) * (mw / width), 0, mw)
    v1 = np.clip((boxes[:, 1] + boxes[:, 3]) * (mh / height), 0, mh)
    inside = (
        _area(integral, u1, v1) - _area(integral, u0, v1) - _area(integral, u1, v0)
        + _area(integral, u0, v0)
    )  # fmt: skip
    area = np.maximum((u1 - u0) * (v1 - v0), 1e-12)
    return np.clip(inside / area, 0, 1).astype(np.float32)


def _area(integral: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask area in [0, u) x [0, v): the integral image is bilinear inside each pixel."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    i = np.minimum(np.floor(u).astype(np.int64), w - 1)
    j = np.minimum(np.floor(v).astype(np.int64), h - 1)
    fu, fv = u - i, v - j
    top = integral[j, i] * (1 - fu) + integral[j, i + 1] * fu
    bottom = integral[j + 1, i] * (1 - fu) + integral[j + 1, i + 1] * fu
    return top * (1 - fv) + bottom * fv


def make_grid(
    slide: Slide,
    cfg: TilesConfig | None = None,
    mask: np.ndarray | None = None,
    checksum: str = "",
) -> TileGrid:
    """Tile grid over the tissue of `slide`; `mask` (whole-slide, any resolution) is computed
    from a thumbnail at `cfg.tissue.mpp` when not given."""
    cfg = cfg or TilesConfig()
    width, height = slide.dimensions
    size0, stride0 = tile_geometry(slide.mpp, cfg.tile_px, cfg.mpp, cfg.stride)
    if mask is None:
        mask = tissue_mask(slide.thumbnail(cfg.tissue.mpp), cfg.tissue.mpp, cfg.tissue)
    pos = tile_positions(width, height, size0, stride0)
    boxes = np.concatenate([pos, np.full_like(pos, size0)], axis=1)
    frac = mask_fractions(mask, boxes, width, height)
    keep = frac >= cfg.min_tissue_fraction
    table = {c: boxes[keep, i] for i, c in enumerate(COLUMNS[:4])}
    table["tissue_fraction"] = frac[keep]
    return TileGrid(
        slide_path=str(Path(slide.path).resolve()),
        slide_mpp=float(slide.mpp),
        slide_width=int(width),
        slide_height=int(height),
        mpp=cfg.mpp,
        tile_px=cfg.tile_px,
        stride_px=cfg.stride,
        params=cfg.model_dump(mode="json"),
        table=table,
        slide_checksum=checksum,
    )
