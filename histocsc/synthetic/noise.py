"""Deterministic noise: hashed lattice noise for pixels, smooth random fields for layouts.

Lattice noise is a pure function of the (global) coordinate and a seed, so any tile of a slide
renders the same pixels whatever the block it is rendered in.
"""

from __future__ import annotations

import cv2
import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0xFF51AFD7ED558CCD)
_M4 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S40 = np.uint64(40)


def hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform float32 values in [0, 1) from integer lattice coordinates and a seed."""
    salt = np.uint64((int(seed) * 0x165667B19E3779F9 + 0x27D4EB2F165667C5) % 2**64)
    h = (ix.astype(np.int64).astype(np.uint64) * _M1) ^ (
        iy.astype(np.int64).astype(np.uint64) * _M2
    )
    h ^= salt
    h ^= h >> _S33
    h *= _M3
    h ^= h >> _S33
    h *= _M4
    h ^= h >> _S33
    return (h >> _S40).astype(np.float32) * np.float32(1.0 / 2**24)


def lattice_noise(gx: np.ndarray, gy: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) at lattice coordinates (gx, gy) (one lattice cell = 1.0)."""
    gx = np.asarray(gx, np.float32)
    gy = np.asarray(gy, np.float32)
    ix0 = int(np.floor(gx.min())) - 2
    iy0 = int(np.floor(gy.min())) - 2
    nx = int(np.ceil(gx.max())) - ix0 + 3
    ny = int(np.ceil(gy.max())) - iy0 + 3
    iy, ix = np.mgrid[iy0 : iy0 + ny, ix0 : ix0 + nx]
    lattice = hash01(ix, iy, seed)
    out = cv2.remap(
        lattice,
        np.subtract(gx, np.float32(ix0), dtype=np.float32),
        np.subtract(gy, np.float32(iy0), dtype=np.float32),
        cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.clip(out, 0.0, 1.0)


def fractal_noise(
    u: np.ndarray, v: np.ndarray, scale: float, seed: int, octaves: int = 3
) -> np.ndarray:
    """Sum of `octaves` lattice noises (coarsest cell `scale` px), rescaled to about [0, 1]."""
    total = np.zeros(np.shape(u), np.float32)
    norm = 0.0
    for k in range(octaves):
        f = 2.0**k
        w = 0.5**k
        total += np.float32(w) * lattice_noise(u * (f / scale), v * (f / scale), seed * 7919 + k)
        norm += w
    return total / np.float32(norm)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """A random smooth field of unit spread whose features are about `cells` grid cells wide."""
    cells = max(float(cells), 1.0)
    low = (int(np.ceil(shape[0] / cells)) + 4, int(np.ceil(shape[1] / cells)) + 4)
    white = rng.standard_normal(low).astype(np.float32)
    white = cv2.GaussianBlur(white, (0, 0), 0.8, borderType=cv2.BORDER_REFLECT)
    big = cv2.resize(
        white,
        (int(round(low[1] * cells)), int(round(low[0] * cells))),
        interpolation=cv2.INTER_CUBIC,
    )
    off = int(cells)
    out = big[off : off + shape[0], off : off + shape[1]]
    std = float(out.std()) or 1.0
    return ((out - out.mean()) / std).astype(np.float32)
