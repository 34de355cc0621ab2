"""label_map_<M>.png: the H&E thumbnail with each tile painted by its label, and the cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histocsc.io import atomic_path

LABEL_COLOURS = {1: (220, 30, 30), 0: (30, 180, 60), -1: (150, 150, 150)}


def write_label_map(
    path: str | Path,
    thumbnail: np.ndarray,
    thumb_scale: float,
    tiles_xywh: np.ndarray,
    label: np.ndarray,
    alpha: float = 0.45,
    cell_points: np.ndarray | None = None,
) -> None:
    """PNG of the H&E thumbnail with tiles painted: red positive, green negative, grey ignored.

    `thumb_scale` is thumbnail px per H&E level-0 px. `cell_points` ((N, 3): H&E level-0 x, y,
    class 0-3): a dot per detected cell, blue negative, yellow / orange / dark red 1+ / 2+ / 3+.
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
    if cell_points is not None and len(cell_points):
        draw_cells(out, cell_points, thumb_scale)
    with atomic_path(path) as tmp:
        Image.fromarray(out.round().astype(np.uint8)).save(tmp, format="PNG")


CELL_COLOURS = np.array([(40, 90, 230), (250, 220, 40), (250, 140, 20), (150, 0, 0)], np.float32)


def draw_cells(image: np.ndarray, cell_points: np.ndarray, scale: float) -> None:
    """Paint a dot (a pixel, or a disc when cells are far apart on the image) per cell."""
    pts = np.asarray(cell_points, np.float64)
    h, w = image.shape[:2]
    x = np.clip((pts[:, 0] * scale).astype(np.int64), 0, w - 1)
    y = np.clip((pts[:, 1] * scale).astype(np.int64), 0, h - 1)
    cls = np.clip(pts[:, 2].astype(np.int64), 0, 3)
    order = np.argsort(cls, kind="stable")  # positive cells on top
    image[y[order], x[order]] = CELL_COLOURS[cls[order]]
