"""Benchmark `histocsc tiles --save-images` against a plain OpenSlide read_region loop.

    python scripts/make_bench_slide.py            # once: bench-output/bench-slide.tiff
    python scripts/bench_tiles.py

For each process count, in the same run: (1) the whole `histocsc tiles --save-images` command
(process start, tissue mask, grid, pictures, tile pixels written to tiles.npy) timed from outside;
(2) the raw-read limit: the same tiles, split evenly over the same number of processes, each
process looping `OpenSlide.read_region` over its tiles (slide opening excluded, pixels
discarded). Prints tiles/s for both and their ratio (the target is >= 0.75).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide

from histocsc.wsi.grid import TileGrid


def raw_loop(args: tuple[str, np.ndarray]) -> tuple[float, float]:
    """Read every box with read_region; return wall-clock start and end."""
    path, boxes = args
    slide = openslide.OpenSlide(path)
    start = time.time()
    for x, y, w, h in boxes.tolist():
        slide.read_region((x, y), 0, (w, h))
    end = time.time()
    slide.close()
    return start, end


def run_raw(slide: Path, boxes: np.ndarray, workers: int) -> float:
    """Seconds for `workers` processes to read all boxes (from first start to last end)."""
    parts = [(str(slide), part) for part in np.array_split(boxes, workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        spans = pool.map(raw_loop, parts)
    return max(e for _, e in spans) - min(s for s, _ in spans)


def run_tiles(slide: Path, out: Path, workers: int, tile_px: int) -> tuple[float, int]:
    """Seconds for the whole `histocsc tiles --save-images` command, and its tile count."""
    cmd = [
        sys.executable, "-m", "histocsc", "tiles", str(slide), "--out", str(out),
        "--save-images", "--workers", str(workers), "--tile-px", str(tile_px), "--mpp", "0.5",
        "--force",
    ]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - start
    grid = TileGrid.load(out / slide.stem)
    store = np.load(out / slide.stem / "tiles.npy", mmap_mode="r")
    assert store.shape == (len(grid), tile_px, tile_px, 3)
    return took, len(grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slide", type=Path, default=Path("bench-output/bench-slide.tiff"))
    parser.add_argument("--out", type=Path, default=Path("bench-output/bench-tiles"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--keep", action="store_true", help="keep the extracted tiles")
    args = parser.parse_args()
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: not found; run scripts/make_bench_slide.py first")
    with args.slide.open("rb") as f:  # warm the page cache so neither side pays the first read
        while f.read(64 * 2**20):
            pass
    print(f"slide {args.slide} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    rows = []
    for workers in args.workers:
        out = args.out / f"w{workers}"
        took, n = run_tiles(args.slide, out, workers, args.tile_px)
        boxes = TileGrid.load(out / args.slide.stem).boxes
        raw = run_raw(args.slide, boxes, workers)
        rows.append((workers, n, n / took, n / raw))
        if not args.keep:
            shutil.rmtree(out)
        print(
            f"{workers} process(es): {n} tiles | histocsc tiles --save-images {n / took:7.0f} "
            f"tiles/s ({took:.1f} s) | raw read_region loop {n / raw:7.0f} tiles/s ({raw:.1f} s)"
            f" | ratio {raw / took:.2f}"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
