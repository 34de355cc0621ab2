"""Write each slide's thumbnail beside its tissue mask (outlined in green) as a PNG, to look at.

python scripts/show_tissue_masks.py ../shared/data/real/svs/*.svs --out docs/img
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from histocsc.wsi.slide import open_slide
from histocsc.wsi.tissue import TissueConfig, tissue_mask


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Thumbnail | thumbnail with non-tissue dimmed and the mask outline in green."""
    shown = rgb.copy()
    shown[~mask] = (shown[~mask] * 0.4).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(shown, contours, -1, (0, 200, 0), 1)
    return np.concatenate([rgb, np.full((rgb.shape[0], 8, 3), 255, np.uint8), shown], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("slides", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--mpp", type=float, default=None, help="thumbnail mpp (config default)")
    parser.add_argument("--slide-mpp", type=float, default=0.5, help="used when a slide has none")
    args = parser.parse_args()
    cfg = TissueConfig() if args.mpp is None else TissueConfig(mpp=args.mpp)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.slides:
        with open_slide(path) as probe:
            slide_mpp = None if probe.has_mpp else args.slide_mpp
        with open_slide(path, mpp=slide_mpp) as slide:
            rgb = slide.thumbnail(cfg.mpp)
        mask = tissue_mask(rgb, cfg.mpp, cfg)
        out = args.out / f"tissue-{path.stem}.png"
        Image.fromarray(overlay(rgb, mask)).save(out)
        print(f"{out}: {rgb.shape[1]}x{rgb.shape[0]} px, tissue {mask.mean():.1%}")


if __name__ == "__main__":
    main()
