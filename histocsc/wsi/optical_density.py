"""Optical density: the one formula every stage uses (tissue masks, deconvolution, stain jitter).

Unit: base-10 optical density (OD), as QuPath uses: ``OD = -log10(I / I0)`` per RGB channel, with
``I`` clipped to ``[1, I0]`` and ``I0 = 255`` (white glass). OD 0 is white; the darkest 8-bit
pixel gives ``log10(255) ~ 2.41``. Natural-log units are these times ``ln(10)``.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 255.0  # I0: the intensity of white glass
MAX_OD = float(np.log10(BACKGROUND))  # OD of the darkest 8-bit pixel
# OD of every uint8 value (float32, read-only): indexing it is the fast path for uint8 images
OD_LUT = (-np.log10(np.clip(np.arange(256, dtype=np.float64), 1, BACKGROUND) / BACKGROUND)).astype(
    np.float32
)
OD_LUT.flags.writeable = False


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Base-10 OD per channel, float32 (H, W, 3), from RGB (uint8, or any numbers 0-255)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return OD_LUT[rgb[..., :3]]
    values = np.clip(rgb[..., :3].astype(np.float64), 1, BACKGROUND)
    return (-np.log10(values / BACKGROUND)).astype(np.float32)
