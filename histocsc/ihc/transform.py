"""A registration result as a point mapping between two slides, both directions, in level-0 px.

Each direction is a `Mapping`: ``y = A @ (x + d(x))`` where ``x`` is a point of the source slide,
``d`` an optional smooth displacement sampled on a coarse regular grid over the source slide
(bilinear between nodes) and ``A`` a 3x3 affine matrix. `Transform` holds both directions:

- ``transform.to_fixed(points_moving)``: moving (IHC) level-0 px -> fixed (H&E) level-0 px;
- ``transform.to_moving(points_fixed)``: fixed (H&E) level-0 px -> moving (IHC) level-0 px.

Coordinates are continuous level-0 px: pixel (i, j) covers [i, i + 1) x [j, j + 1), so its centre
is (i + 0.5, j + 0.5) (the convention of the tile grid and the phantom truth).

Saved as JSON (``DIR/transform.json``) with the slides, the working resolution and an error
estimate.
"""

from __future__ import annotations

import base64
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from histocsc.errors import (
    DataError,
    DataNotFoundError,
    RegistrationError,
    RegistrationNotFoundError,
)
from histocsc.io import atomic_path, read_json, write_json

FORMAT = "histocsc-transform"
VERSION = 1
ENCODING = "base64-float32-le"  # displacement grids: row-major little-endian float32, base64


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).astype(np.float32)


@dataclass
class Mapping:
    """``y = affine @ (x + d(x))``; ``d`` on a grid: node (i, j) at ``origin + (j, i) * spacing``.

    `displacement` is float32 (2, rows, cols): dx then dy, in source level-0 px; None = affine only.
    """

    affine: np.ndarray
    displacement: np.ndarray | None = None
    origin: tuple[float, float] = (0.0, 0.0)
    spacing: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64).reshape(3, 3)
        if self.displacement is not None:
            self.displacement = np.asarray(self.displacement, dtype=np.float32)
        self.origin = (float(self.origin[0]), float(self.origin[1]))
        self.spacing = (float(self.spacing[0]), float(self.spacing[1]))

    def displace(self, points: np.ndarray) -> np.ndarray:
        """``x + d(x)`` for (N, 2) points (the affine not applied)."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.displacement is None:
            return pts.copy()
        cols = (pts[:, 0] - self.origin[0]) / self.spacing[0]
        rows = (pts[:, 1] - self.origin[1]) / self.spacing[1]
        coords = np.vstack([rows, cols])
        dx = ndimage.map_coordinates(self.displacement[0], coords, order=1, mode="nearest")
        dy = ndimage.map_coordinates(self.displacement[1], coords, order=1, mode="nearest")
        return pts + np.column_stack([dx, dy])

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) points (x, y) from the source to the target slide."""
        pts = self.displace(points)
        return pts @ self.affine[:2, :2].T + self.affine[:2, 2]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"affine": self.affine.tolist(), "displacement": None}
        if self.displacement is not None:
            out["displacement"] = {
                "origin": list(self.origin),
                "spacing": list(self.spacing),
                "shape": list(self.displacement.shape[1:]),
                "encoding": ENCODING,
                "dx": _encode(self.displacement[0]),
                "dy": _encode(self.displacement[1]),
            }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mapping:
        disp = data.get("displacement")
        if not disp:
            return cls(np.array(data["affine"]))
        shape = tuple(int(n) for n in disp["shape"])
        field_ = np.stack([_decode(disp["dx"], shape), _decode(disp["dy"], shape)])
        return cls(np.array(data["affine"]), field_, tuple(disp["origin"]), tuple(disp["spacing"]))


@dataclass
class Transform:
    """Both directions between a fixed (H&E) and a moving (IHC) slide, level-0 px."""

    fixed_to_moving: Mapping
    moving_to_fixed: Mapping
    fixed: dict[str, Any] = field(default_factory=dict)  # path, width, height, mpp
    moving: dict[str, Any] = field(default_factory=dict)
    working_mpp: float | None = None
    error: dict[str, Any] = field(default_factory=dict)  # error estimate, see registration
    meta: dict[str, Any] = field(default_factory=dict)

    def to_fixed(self, points_moving: np.ndarray) -> np.ndarray:
        """Moving (IHC) level-0 (x, y) -> fixed (H&E) level-0 (x, y), (N, 2) float64."""
        return self.moving_to_fixed(points_moving)

    def to_moving(self, points_fixed: np.ndarray) -> np.ndarray:
        """Fixed (H&E) level-0 (x, y) -> moving (IHC) level-0 (x, y), (N, 2) float64."""
        return self.fixed_to_moving(points_fixed)

    @property
    def is_affine(self) -> bool:
        return self.fixed_to_moving.displacement is None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "convention": "y = affine @ (x + displacement(x)); points (x, y) in level-0 px",
            "fixed": self.fixed,
            "moving": self.moving,
            "working_mpp": self.working_mpp,
            "error": self.error,
            "meta": self.meta,
            "fixed_to_moving": self.fixed_to_moving.to_dict(),
            "moving_to_fixed": self.moving_to_fixed.to_dict(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "transform") -> Transform:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RegistrationError(f"{source}: not a histocsc transform file")
        try:
            return cls(
                fixed_to_moving=Mapping.from_dict(data["fixed_to_moving"]),
                moving_to_fixed=Mapping.from_dict(data["moving_to_fixed"]),
                fixed=data.get("fixed", {}),
                moving=data.get("moving", {}),
                working_mpp=data.get("working_mpp"),
                error=data.get("error", {}),
                meta=data.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistrationError(f"{source}: malformed transform ({exc!r})") from None

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` (a file, or a folder that gets `transform.json`)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "transform.json"
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Transform:
        path = Path(path)
        if path.is_dir():
            path = path / "transform.json"
        if not path.is_file():
            raise RegistrationNotFoundError(f"{path}: transform file not found")
        try:
            data = read_json(path)
        except ValueError as exc:
            raise RegistrationError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(data, str(path))


def invert_mapping(
    mapping: Mapping,
    width: int,
    height: int,
    spacing: float,
    iterations: int = 30,
) -> Mapping:
    """The inverse of `mapping` as a Mapping on a grid over the target slide (width x height).

    Needs a smooth, small displacement (fixed-point iteration ``x = z - d(x)``).
    """
    inv_affine = np.linalg.inv(mapping.affine)
    if mapping.displacement is None:
        return Mapping(inv_affine)
    cols = int(np.ceil(width / spacing)) + 1
    rows = int(np.ceil(height / spacing)) + 1
    gx, gy = np.meshgrid(np.arange(cols) * spacing, np.arange(rows) * spacing)
    targets = np.column_stack([gx.ravel(), gy.ravel()])
    z = targets @ inv_affine[:2, :2].T + inv_affine[:2, 2]
    x = z.copy()
    for _ in range(iterations):
        x = z - (mapping.displace(x) - x)
    # express as y = inv_affine @ (q + w(q)): w(q) = A @ x - q
    w = x @ mapping.affine[:2, :2].T + mapping.affine[:2, 2] - targets
    disp = np.stack([w[:, 0].reshape(rows, cols), w[:, 1].reshape(rows, cols)]).astype(np.float32)
    return Mapping(inv_affine, disp, (0.0, 0.0), (spacing, spacing))


def read_points_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Landmark CSV (header ``,X,Y``; rows ``index,x,y``, level-0 px) -> (indices, (N, 2))."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: points file not found")
    rows = list(csv.reader(path.read_text().splitlines()))
    if not rows or [c.strip().upper() for c in rows[0][-2:]] != ["X", "Y"]:
        raise DataError(f"{path}: expected a header ',X,Y' (landmark CSV)")
    index, points = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        try:
            x, y = float(row[-2]), float(row[-1])
        except (ValueError, IndexError):
            raise DataError(f"{path}: line {n}: expected index,x,y numbers, got {row}") from None
        index.append(row[0] if len(row) >= 3 else str(len(index)))
        points.append((x, y))
    return index, np.array(points, dtype=np.float64).reshape(-1, 2)


def write_points_csv(path: str | Path, index: list[str], points: np.ndarray) -> None:
    """Write points in the landmark CSV format (atomic)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "X", "Y"])
        for i, (x, y) in zip(index, np.asarray(points).reshape(-1, 2), strict=True):
            writer.writerow([i, f"{x:.3f}", f"{y:.3f}"])
