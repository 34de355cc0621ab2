"""Build a large benchmark slide: real H&E patches mosaicked into a pyramidal JPEG TIFF.

    python scripts/make_bench_slide.py --out bench-output/bench-slide.tiff

The slide is about 40000 x 30000 px at 0.5 µm/px. It is cut into square cells; a smooth random
field (seeded) decides which cells are tissue and which are glass, so tissue detection has real
work. A tissue cell is a patch drawn from a tissue region of one of the source slides (the real
SVS files in ../shared/data/real/svs), a glass cell a patch from their background; patches are
randomly mirrored. The same seed gives the same slide, byte for byte.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import cv2
import numpy as np

from histocsc.wsi.pyramid import write_pyramid_tiff
from histocsc.wsi.slide import open_slide
from histocsc.wsi.tissue import TissueConfig, tissue_mask

REAL_SVS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "svs"


def load_sources(paths: list[Path], fallback_mpp: float) -> list[np.ndarray]:
    """Level-0 pixels of each source slide."""
    sources = []
    for path in paths:
        with open_slide(path) as probe:
            mpp = None if probe.has_mpp else fallback_mpp
        with open_slide(path, mpp=mpp) as slide:
            sources.append(slide.read(0, 0, *slide.dimensions))
    return sources


def patch_corners(
    rgb: np.ndarray, cell: int, tissue: bool, rng: np.random.Generator, n: int = 400
) -> list[tuple[int, int]]:
    """Top-left corners of `cell`-sized windows that are mostly tissue (or all glass)."""
    cfg = TissueConfig()
    scale = 8
    small = cv2.resize(
        rgb, (rgb.shape[1] // scale, rgb.shape[0] // scale), interpolation=cv2.INTER_AREA
    )
    mask = tissue_mask(small, 0.5 * scale, cfg)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    k = cell // scale
    ys = rng.integers(0, mask.shape[0] - k, n)
    xs = rng.integers(0, mask.shape[1] - k, n)
    frac = (
        integral[ys + k, xs + k] - integral[ys, xs + k] - integral[ys + k, xs] + integral[ys, xs]
    ) / (k * k)
    good = frac >= 0.8 if tissue else frac == 0
    return [(int(x) * scale, int(y) * scale) for x, y in zip(xs[good], ys[good], strict=True)]


def layout(rows: int, cols: int, rng: np.random.Generator, tissue_share: float) -> np.ndarray:
    """Boolean (rows, cols): True where a cell is tissue; blobs from a smoothed random field."""
    noise = rng.standard_normal((rows, cols)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(rows, cols) / 12)
    return field > np.quantile(field, 1 - tissue_share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-output/bench-slide.tiff"))
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", type=int, default=512, help="patch size, a multiple of 256")
    parser.add_argument("--tissue-share", type=float, default=0.6)
    parser.add_argument("--sources", type=Path, nargs="*", default=sorted(REAL_SVS.glob("*.svs")))
    args = parser.parse_args()
    if not args.sources:
        parser.error(f"no source slides (looked in {REAL_SVS})")
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    sources = load_sources(args.sources, args.mpp)
    tissue = [(i, c) for i, s in enumerate(sources) for c in patch_corners(s, args.cell, True, rng)]
    glass = [(i, c) for i, s in enumerate(sources) for c in patch_corners(s, args.cell, False, rng)]
    if not tissue or not glass:
        raise SystemExit("source slides have no usable tissue or glass windows")
    rows, cols = -(-args.height // args.cell), -(-args.width // args.cell)
    is_tissue = layout(rows, cols, rng, args.tissue_share)
    picks = rng.integers(0, 1 << 30, (rows, cols))
    flips = rng.integers(0, 4, (rows, cols))

    @functools.lru_cache(maxsize=2 * cols)
    def cell(r: int, c: int) -> np.ndarray:
        pool = tissue if is_tissue[r, c] else glass
        src, (x, y) = pool[picks[r, c] % len(pool)]
        patch = sources[src][y : y + args.cell, x : x + args.cell]
        if flips[r, c] & 1:
            patch = patch[:, ::-1]
        if flips[r, c] & 2:
            patch = patch[::-1]
        return np.ascontiguousarray(patch)

    def read_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        r, c = y // args.cell, x // args.cell
        oy, ox = y - r * args.cell, x - c * args.cell
        return cell(r, c)[oy : oy + h, ox : ox + w]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    desc = f"histocsc benchmark slide seed={args.seed} {args.width}x{args.height}"
    write_pyramid_tiff(
        args.out, args.height, args.width, read_tile, args.mpp, tile=256, description=desc
    )
    took = time.perf_counter() - start
    share = is_tissue.mean()
    size_mb = args.out.stat().st_size / 1e6
    print(f"{args.out}: {args.width}x{args.height} px at {args.mpp} µm/px,")
    print(f"  tissue cells {share:.0%}, {size_mb:.0f} MB, built in {took:.0f} s")


if __name__ == "__main__":
    main()
