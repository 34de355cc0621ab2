"""Time `register` on a pair of 40000 x 30000 px pyramidal slides (target: under 60 s).

The pair is the real rat-kidney H&E / pan-cytokeratin IHC pair (../shared/data/real/registration)
scaled up to 40000 px wide at --mpp µm/px (default 0.25: a 10 x 7.5 mm section) and written
tile by tile as pyramidal JPEG TIFFs (once, into --workdir; reused on later runs). Registration
reads only a low-resolution level. The baseline, timed in the same run, is the same pair
registered from the original 5 % JPEGs.

    python scripts/bench_register.py [--workdir /tmp/bench_register]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from histocsc.ihc.registration import register
from histocsc.wsi.pyramid import write_pyramid_tiff

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "registration"
PAIR = ("Rat-Kidney_HE.jpg", "Rat-Kidney_PanCytokeratin.jpg")
WIDTH, HEIGHT = 40000, 30000


def big_slide(src: Path, out: Path, mpp: float) -> Path:
    """Write `src` scaled to fill WIDTH x HEIGHT (white margin) as a pyramidal TIFF."""
    if out.is_file():
        return out
    rgb = np.asarray(Image.open(src).convert("RGB"))
    scale = min(WIDTH / rgb.shape[1], HEIGHT / rgb.shape[0])

    def read_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        m = np.array([[scale, 0, -x], [0, scale, -y]], np.float32)
        return cv2.warpAffine(
            rgb,
            m,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(255, 255, 255),
        )

    t0 = time.perf_counter()
    write_pyramid_tiff(out, HEIGHT, WIDTH, read_tile, mpp, quality=80)
    print(f"wrote {out} ({WIDTH} x {HEIGHT} px) in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_register"))
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px of the big slides")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    fixed = big_slide(REAL / PAIR[0], args.workdir / f"big_HE_{args.mpp:g}.tiff", args.mpp)
    moving = big_slide(REAL / PAIR[1], args.workdir / f"big_IHC_{args.mpp:g}.tiff", args.mpp)

    t0 = time.perf_counter()
    register(REAL / PAIR[0], REAL / PAIR[1], 10.0, 10.0)
    t_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    big = register(fixed, moving)
    t_big = time.perf_counter() - t0
    print(f"baseline: 5% JPEG pair (1164 x 787 px): {t_small:.1f} s")
    print(
        f"40000 x 30000 px pyramidal pair: {t_big:.1f} s (target < 60 s), "
        f"{t_big / t_small:.2f} x baseline; working {big.transform.working_mpp} µm/px, "
        f"residual estimate {big.error['residual_um_median']} µm, NCC {big.error['ncc']:.3f}"
    )


if __name__ == "__main__":
    main()
