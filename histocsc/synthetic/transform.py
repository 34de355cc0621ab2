"""The known geometry between a phantom H&E section and its serial IHC section.

    ihc = A @ he + t + sum_k a_k * sin(2 pi f_k . he + phi_k)

A is a rotation (up to +-30 degrees) times a scale (0.95-1.05), optionally mirrored; the sum is
a smooth elastic warp of a few tens of microns. All in level-0 pixels of each slide. The inverse
is found numerically (fixed-point iteration; the warp's gradient is kept far below 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MAX_WARP_GRADIENT = 0.15


@dataclass(frozen=True)
class SectionTransform:
    """H&E level-0 px -> IHC level-0 px."""

    matrix: np.ndarray  # (2, 3): [A | t]
    amplitudes: np.ndarray  # (K, 2) px
    frequencies: np.ndarray  # (K, 2) cycles per px
    phases: np.ndarray  # (K,) radians
    rotation_deg: float = 0.0
    scale: float = 1.0
    mirror: bool = False

    def warp(self, pts: np.ndarray) -> np.ndarray:
        """The elastic displacement (IHC px) at H&E points (N, 2)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        arg = 2 * np.pi * pts @ self.frequencies.T + self.phases  # (N, K)
        return np.sin(arg) @ self.amplitudes

    def forward(self, pts: np.ndarray) -> np.ndarray:
        """Map H&E points (N, 2) to IHC points."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2] + self.warp(pts)

    def inverse(self, pts: np.ndarray, tol: float = 1e-5, max_iter: int = 30) -> np.ndarray:
        """Map IHC points (N, 2) back to H&E points (to within `tol` px)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        a_inv = np.linalg.inv(self.matrix[:, :2])
        base = pts - self.matrix[:, 2]
        q = base @ a_inv.T
        for _ in range(max_iter):
            nxt = (base - self.warp(q)) @ a_inv.T
            step = float(np.abs(nxt - q).max()) if len(q) else 0.0
            q = nxt
            if step < tol:
                break
        return q

    def inverse_maps(
        self, x0: int, y0: int, w: int, h: int, step: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """H&E coordinates (u, v) of the centres of IHC pixels [x0, x0+w) x [y0, y0+h).

        Exact on a grid of spacing `step` aligned to the slide origin, bilinear between (the
        map is smooth), so a pixel's value does not depend on the block it is rendered in.
        """
        gx0, gy0 = (x0 // step) * step, (y0 // step) * step
        gxs = np.arange(gx0, x0 + w + 2 * step, step, dtype=np.float64)
        gys = np.arange(gy0, y0 + h + 2 * step, step, dtype=np.float64)
        gy, gx = np.meshgrid(gys, gxs, indexing="ij")
        q = self.inverse(np.stack([gx.ravel(), gy.ravel()], 1)).reshape(len(gys), len(gxs), 2)
        # Store relative to the grid origin so float32 keeps sub-millipixel precision.
        ref = q[0, 0].copy()
        grid = (q - ref).astype(np.float32)
        xs = ((np.arange(x0, x0 + w) + 0.5 - gx0) / step).astype(np.float32)
        ys = ((np.arange(y0, y0 + h) + 0.5 - gy0) / step).astype(np.float32)
        mx, my = np.meshgrid(xs, ys)
        out = cv2.remap(grid, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return out[..., 0] + np.float32(ref[0]), out[..., 1] + np.float32(ref[1])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (see module docstring for the formula)."""
        return {
            "type": "affine+sinusoidal",
            "formula": "ihc = A @ he + t + sum_k a_k * sin(2*pi*dot(f_k, he) + phi_k)",
            "matrix": self.matrix.tolist(),
            "rotation_deg": self.rotation_deg,
            "scale": self.scale,
            "mirror": self.mirror,
            "elastic": [
                {"amplitude": a.tolist(), "frequency": f.tolist(), "phase": float(p)}
                for a, f, p in zip(self.amplitudes, self.frequencies, self.phases, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SectionTransform:
        """Inverse of `to_dict`."""
        el = d.get("elastic", [])
        return cls(
            matrix=np.asarray(d["matrix"], np.float64).reshape(2, 3),
            amplitudes=np.asarray([e["amplitude"] for e in el], np.float64).reshape(-1, 2),
            frequencies=np.asarray([e["frequency"] for e in el], np.float64).reshape(-1, 2),
            phases=np.asarray([e["phase"] for e in el], np.float64).reshape(-1),
            rotation_deg=float(d.get("rotation_deg", 0.0)),
            scale=float(d.get("scale", 1.0)),
            mirror=bool(d.get("mirror", False)),
        )


def random_transform(
    rng: np.random.Generator,
    centre_he: tuple[float, float],
    centre_ihc: tuple[float, float],
    mpp: float,
    max_rotation_deg: float = 30.0,
    mirror_probability: float = 0.3,
    warp_um: tuple[float, float] = (15.0, 40.0),
) -> SectionTransform:
    """A random serial-section transform that takes `centre_he` near `centre_ihc`."""
    rot = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = float(rng.uniform(0.95, 1.05))
    mirror = bool(rng.random() < mirror_probability)
    th = np.deg2rad(rot)
    a = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    if mirror:
        a = a @ np.diag([-1.0, 1.0])
    shift = rng.uniform(-150, 150, 2) / mpp  # up to 150 um off centre
    t = np.asarray(centre_ihc) + shift - a @ np.asarray(centre_he)
    k = 3
    wavelength = rng.uniform(1500, 4000, k) / mpp  # px
    angle = rng.uniform(0, 2 * np.pi, k)
    freqs = np.stack([np.cos(angle), np.sin(angle)], 1) / wavelength[:, None]
    target = rng.uniform(*warp_um) / mpp  # total amplitude, px
    dirs = rng.normal(size=(k, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = dirs * (target / k) * rng.uniform(0.6, 1.4, (k, 1))
    grad = float(np.sum(np.linalg.norm(amps, axis=1) * 2 * np.pi * np.linalg.norm(freqs, axis=1)))
    if grad > MAX_WARP_GRADIENT:
        amps *= MAX_WARP_GRADIENT / grad
    return SectionTransform(
        matrix=np.concatenate([a, t[:, None]], 1),
        amplitudes=amps,
        frequencies=freqs,
        phases=rng.uniform(0, 2 * np.pi, k),
        rotation_deg=rot,
        scale=scale,
        mirror=mirror,
    )
