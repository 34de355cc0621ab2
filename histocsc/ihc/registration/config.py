"""Parameters of `register` (configs/register.yaml) and the result it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from histocsc.config import StrictModel
from histocsc.errors import RegistrationError
from histocsc.ihc.transform import Transform
from histocsc.io import atomic_path


class RegistrationConfig(StrictModel):
    """Parameters of `register` (configs/register.yaml)."""

    work_mpp: float = Field(8.0, gt=0, description="resolution of the final fit (µm/px)")
    coarse_mpp: float = Field(32.0, gt=0, description="resolution of the initial search")
    feature_mpp: float = Field(20.0, gt=0, description="resolution of the SIFT features")
    channel: Literal["hematoxylin", "hematoxylin+dab", "total_od"] = "hematoxylin"
    fixed_stains: str = Field("H&E", description="stain matrix of the fixed slide")
    moving_stains: str = Field("H-DAB", description="stain matrix of the moving slide")
    tissue_od: float = Field(0.12, gt=0, description="total-OD tissue threshold (at most)")
    ink: list[Literal["green", "blue", "black"]] = Field(
        default_factory=lambda: ["green"], description="marker-pen colours ignored"
    )
    mirror: bool = Field(True, description="also try the mirrored moving section")
    angle_step: float = Field(10.0, gt=0, le=90, description="angle sweep of the search (deg)")
    candidates: int = Field(4, ge=1, description="sweep candidates refined by ECC")
    motion: Literal["euclidean", "affine"] = "affine"
    ecc_iterations: int = Field(300, ge=10)
    ecc_eps: float = Field(1e-6, gt=0)
    mask_weight: float = Field(0.0, ge=0, description="tissue-mask weight in the affine fit")
    ecc_blur_um: float = Field(2.0, ge=0, description="blur of the images for ECC (µm)")
    nonrigid: bool = True
    nonrigid_iterations: int = Field(1, ge=0, description="optical-flow passes (1 is best)")
    flow_window_um: float = Field(360.0, gt=0, description="Farneback averaging window (µm)")
    flow_blur_um: float = Field(12.0, ge=0, description="blur of the images for the flow (µm)")
    smooth_um: float = Field(160.0, gt=0, description="Gaussian sigma of the displacement")
    grid_um: float = Field(0.0, ge=0, description="stored displacement grid step (0: auto)")
    max_scale_change: float = Field(1.5, gt=1, description="reject affine scale beyond this")
    min_ncc: float = Field(0.1, description="NCC below this: sections do not match (error)")
    poor_error_um: float = Field(
        45.0, gt=0, description="median residual estimate (µm) above this flags the result poor"
    )
    overlay_px: int = Field(1600, ge=64, description="longest side of overlay.png")


@dataclass
class RegistrationResult:
    """Transform (both directions), error estimate and an overlay image (RGB uint8)."""

    transform: Transform
    error: dict[str, Any]
    overlay: np.ndarray
    poor: bool = False
    log: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> Path:
        """Write `out_dir/transform.json` and `out_dir/overlay.png`; returns the JSON path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = self.transform.save(out_dir / "transform.json")
        write_overlay(out_dir / "overlay.png", self.overlay)
        return path


class RegistrationFailure(RegistrationError):
    """Registration gave up; `overlay` shows the best alignment it tried (or None)."""

    def __init__(self, message: str, overlay: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.overlay = overlay


def write_overlay(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB overlay as PNG (atomic)."""
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def save_failure(out_dir: str | Path, exc: RegistrationError) -> None:
    """After a failed registration: no transform.json, and overlay.png is what was tried.

    Never leaves a stale overlay of an earlier run: without an overlay in `exc` the old one is
    removed.
    """
    out_dir = Path(out_dir)
    (out_dir / "transform.json").unlink(missing_ok=True)
    overlay = getattr(exc, "overlay", None)
    if overlay is None:
        (out_dir / "overlay.png").unlink(missing_ok=True)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_overlay(out_dir / "overlay.png", overlay)
