"""The configuration of IHC tile labels (`configs/label.yaml`): stain thresholds, the label rule
of each marker, cell detection, and the registration QC limit.

Label rules (`rule`, per marker):
- `pixel_fraction`: DAB-positive share of the IHC tissue pixels under the tile, cut by
  `positive_fraction` / `negative_fraction`;
- `positive_cells`: share of the detected cells that are positive (1+ or more, in the marker's
  `compartment`), cut by `positive_cell_fraction` / `negative_cell_fraction`;
- `hscore`: the H-score (0-300) of the tile's cells, cut by `positive_hscore` /
  `negative_hscore`.
A value between the two cuts of a rule is uncertain: label -1 (ignored).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from histocsc.config import StrictModel
from histocsc.ihc.cells import CellConfig, Compartment

Rule = Literal["pixel_fraction", "positive_cells", "hscore"]
CUTS = {  # rule -> (negative cut, positive cut) field names
    "pixel_fraction": ("negative_fraction", "positive_fraction"),
    "positive_cells": ("negative_cell_fraction", "positive_cell_fraction"),
    "hscore": ("negative_hscore", "positive_hscore"),
}


class MarkerThresholds(StrictModel):
    """Per-marker replacements for the settings of LabelConfig (unset: the shared value)."""

    rule: Rule | None = None
    compartment: Compartment | None = None
    dab_od_threshold: float | None = Field(None, ge=0)
    tissue_od_threshold: float | None = Field(None, ge=0)
    positive_fraction: float | None = Field(None, ge=0, le=1)
    negative_fraction: float | None = Field(None, ge=0, le=1)
    positive_cell_fraction: float | None = Field(None, ge=0, le=1)
    negative_cell_fraction: float | None = Field(None, ge=0, le=1)
    positive_hscore: float | None = Field(None, ge=0, le=300)
    negative_hscore: float | None = Field(None, ge=0, le=300)
    min_cells: int | None = Field(None, ge=1)
    min_tissue_fraction: float | None = Field(None, ge=0, le=1)


def _presets() -> dict[str, MarkerThresholds]:
    """The markers people pair with H&E: their compartment and, for the sparse ones, cells."""
    cells = "positive_cells"
    return {
        "CD44": MarkerThresholds(compartment="membrane"),
        "CD133": MarkerThresholds(compartment="membrane"),
        "Ki67": MarkerThresholds(rule=cells, compartment="nuclear"),
        "pan-CK": MarkerThresholds(rule=cells, compartment="cytoplasm"),
    }


class LabelConfig(StrictModel):
    """How IHC stain becomes a tile label. Optical densities are base-10 OD units."""

    markers: list[str] | None = Field(
        None, description="markers to label; None = every marker column of the cohort"
    )
    label_mpp: float = Field(2.0, gt=0, description="µm/px at which the IHC is measured")
    rule: Rule = Field("pixel_fraction", description="how a tile's value is measured")
    compartment: Compartment | None = Field(
        None, description="where a cell's DAB is read; None: the marker's preset, else membrane"
    )
    count_cells: bool = Field(
        False, description="detect cells (labels.csv cell columns) also for pixel_fraction"
    )
    dab_od_threshold: float = Field(
        0.15, ge=0, description="DAB optical density (base-10 OD) above which a pixel is positive"
    )
    dab_background: bool = Field(
        True, description="raise the DAB threshold per slide above its background tint"
    )
    dab_background_margin: float = Field(
        0.1, ge=0, description="positive: DAB OD above the slide's background by this much"
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
    positive_cell_fraction: float = Field(0.1, ge=0, le=1, description="positive_cells: 1 >=")
    negative_cell_fraction: float = Field(0.02, ge=0, le=1, description="positive_cells: 0 <=")
    positive_hscore: float = Field(50.0, ge=0, le=300, description="hscore: label 1 >= this")
    negative_hscore: float = Field(10.0, ge=0, le=300, description="hscore: label 0 <= this")
    min_cells: int = Field(5, ge=1, description="cell rules: tiles with fewer cells are -1")
    min_tissue_fraction: float = Field(
        0.2, ge=0, le=1, description="tiles whose IHC footprint holds less tissue are ignored (-1)"
    )
    cells: CellConfig = Field(default_factory=CellConfig)
    cell_workers: int | None = Field(
        None, ge=1, description="processes detecting cells; None: every usable core"
    )
    max_registration_error_um: float | None = Field(
        None, gt=0, description="flag a marker whose error estimate exceeds this (µm); None: "
        "max_registration_error_tile x the tile side"
    )
    max_registration_error_tile: float = Field(
        0.25, gt=0, description="the error limit as a share of the tile side"
    )
    min_error_blocks: int = Field(5, ge=1, description="blocks an error estimate needs to count")
    min_tissue_overlap: float = Field(
        0.75, ge=0, le=1, description="a marker whose registered tissue overlaps less is flagged"
    )
    label_map_max_px: int = Field(2048, ge=64, description="longest side of label_map_<M>.png")
    label_map_cells: bool = Field(True, description="label maps: dots at the detected cells")
    per_marker: dict[str, MarkerThresholds] = Field(
        default_factory=_presets, description="settings that differ by marker, by marker name"
    )

    @model_validator(mode="after")
    def _band(self) -> LabelConfig:
        for name in [None, *self.per_marker]:
            cfg = self if name is None else self.for_marker(name)
            where = "" if name is None else f"per_marker.{name}: "
            for low, high in CUTS.values():
                if getattr(cfg, low) >= getattr(cfg, high):
                    raise ValueError(
                        f"{where}{low} ({getattr(cfg, low)}) must be below {high} "
                        f"({getattr(cfg, high)})"
                    )
        return self

    def for_marker(self, marker: str) -> LabelConfig:
        """This configuration with `marker`'s own settings applied (no validation rerun)."""
        extra = self.per_marker.get(marker)
        if extra is None:
            return self
        update = {k: v for k, v in extra.model_dump().items() if v is not None}
        return self.model_copy(update={**update, "per_marker": {}})

    def wants_cells(self) -> bool:
        """Whether this (per-marker) configuration detects cells."""
        return self.count_cells or self.rule != "pixel_fraction"

    def error_limit_um(self, tile_um: float) -> float:
        """The registration error (µm) above which labels for tiles of `tile_um` are refused."""
        if self.max_registration_error_um is not None:
            return self.max_registration_error_um
        return self.max_registration_error_tile * tile_um
