"""Training-time tile augmentation with albumentations (uint8 RGB in, uint8 RGB out).

Normalisation is not done here: tiles travel to the device as uint8 and are normalised there.
"""

from __future__ import annotations

import os
from typing import Literal

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from histocsc.config import StrictModel  # noqa: E402
from histocsc.errors import ConfigError  # noqa: E402
from histocsc.wsi.optical_density import OD_LUT  # noqa: E402


class AugmentConfig(StrictModel):
    """Which augmentations run, and how strongly (each `*_p` is a probability; 0 turns it off)."""

    enabled: bool = True
    flip_p: float = 0.5
    rotate90_p: float = 0.5
    affine_p: float = 0.3
    scale: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = 10.0
    translate: float = 0.05
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (0.01, 0.05)
    brightness_contrast_p: float = 0.3
    brightness: float = 0.1
    contrast: float = 0.1
    stain_p: float = 0.5
    # 'hed': HEDJitter below (fast); else an albumentations HEStain method (about 10x slower)
    stain_method: Literal["hed", "random_preset", "preset", "vahadane", "macenko"] = "hed"
    stain_intensity: tuple[float, float] = (0.95, 1.05)  # scale of each stain's density
    stain_shift: tuple[float, float] = (-0.05, 0.05)  # shift of each stain's density


class HEDJitter(A.ImageOnlyTransform):
    """Stain augmentation in hematoxylin-eosin-DAB space (Tellez et al. 2018): each stain's
    optical density is scaled by U(*scale) and shifted by U(*shift).

    Done as one 3 x 3 colour matrix on optical densities (a lookup table for -log, cv2 for
    the matrix and exp), so it costs well under a millisecond per 224 px tile."""

    # Ruifrok & Johnston H, E, DAB optical-density vectors, rows normalised.
    _RGB_FROM_HED = np.array(
        [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
    )
    _RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
    _HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
    _OD_LUT = OD_LUT * np.float32(np.log(10))  # natural-log OD: the shift is in these units

    def __init__(
        self,
        scale: tuple[float, float] = (0.95, 1.05),
        shift: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.scale = tuple(scale)
        self.shift = tuple(shift)

    def get_params(self) -> dict[str, np.ndarray]:
        rng = self.random_generator
        alpha = rng.uniform(self.scale[0], self.scale[1], 3)
        beta = rng.uniform(self.shift[0], self.shift[1], 3)
        # od' = ((od @ H) * alpha + beta) @ R  ==  od @ M + b
        matrix = self._HED_FROM_RGB @ np.diag(alpha) @ self._RGB_FROM_HED
        offset = beta @ self._RGB_FROM_HED
        return {"matrix": matrix.astype(np.float32), "offset": offset.astype(np.float32)}

    def apply(
        self, img: np.ndarray, matrix: np.ndarray, offset: np.ndarray, **_: object
    ) -> np.ndarray:
        od = self._OD_LUT[img]  # (H, W, 3) float32
        # cv2.transform: dst[c] = sum_k m[c, k] * src[k] + m[c, 3]
        m = np.concatenate([matrix.T, offset[:, None]], axis=1)
        neg_od = cv2.transform(od, -m)
        out = cv2.exp(neg_od) * 255.0 + 0.5
        return np.clip(out, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "shift")


def stain_transform(cfg: AugmentConfig) -> A.BasicTransform:
    """The project's fast HEDJitter ('hed'), or albumentations' HEStain with that method."""
    if cfg.stain_method == "hed":
        return HEDJitter(scale=cfg.stain_intensity, shift=cfg.stain_shift, p=cfg.stain_p)
    if not hasattr(A, "HEStain"):
        raise ConfigError(
            f"augment.stain_method {cfg.stain_method!r} needs albumentations HEStain, which "
            f"albumentations {A.__version__} lacks; use 'hed'"
        )
    return A.HEStain(
        method=cfg.stain_method,
        intensity_scale_range=cfg.stain_intensity,
        intensity_shift_range=cfg.stain_shift,
        p=cfg.stain_p,
    )


def build_augment(cfg: AugmentConfig | None, train: bool = True) -> A.Compose | None:
    """The training pipeline, or None (no-op) for validation/test or when disabled."""
    if cfg is None or not train or not cfg.enabled:
        return None
    steps: list[A.BasicTransform] = []
    if cfg.flip_p > 0:
        steps += [A.HorizontalFlip(p=cfg.flip_p), A.VerticalFlip(p=cfg.flip_p)]
    if cfg.rotate90_p > 0:
        steps.append(A.RandomRotate90(p=cfg.rotate90_p))
    if cfg.affine_p > 0:
        steps.append(
            A.Affine(
                scale=cfg.scale,
                rotate=(-cfg.rotate_deg, cfg.rotate_deg),
                translate_percent=(-cfg.translate, cfg.translate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=cfg.affine_p,
            )
        )
    if cfg.stain_p > 0:
        steps.append(stain_transform(cfg))
    if cfg.brightness_contrast_p > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=cfg.brightness,
                contrast_limit=cfg.contrast,
                p=cfg.brightness_contrast_p,
            )
        )
    if cfg.blur_p > 0:
        steps.append(A.GaussianBlur(sigma_limit=cfg.blur_sigma, p=cfg.blur_p))
    if cfg.noise_p > 0:
        steps.append(A.GaussNoise(std_range=cfg.noise_std, p=cfg.noise_p))
    return A.Compose(steps) if steps else None
