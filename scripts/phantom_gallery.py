"""Write docs/img/phantom_gallery.png: a phantom case beside real H&E and real IHC.

Row 1: thumbnails of the H&E, each IHC, and the marker masks over the H&E.
Row 2: level-0 tiles (256 um) of the H&E at a stem-like region positive for every marker, at a
region positive for CD44 only (when the case has one), at a lymphoid aggregate (the look-alike
distractor) and in ordinary tumour/stroma, and of each IHC at the same stem region.
Row 3: 64 um crops at the centre of the row-2 H&E tiles, enlarged, to show the nuclei.
Row 4: real references: H&E tiles from ../shared/data/real and skimage's real DAB IHC image.

    .venv/bin/python scripts/phantom_gallery.py [--size-px 6144] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import openslide  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from histocsc.synthetic.generate import make_case  # noqa: E402
from histocsc.synthetic.truth import he_to_ihc, load_mask, load_truth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 90, 230), (230, 170, 30)]


def read(path: str, x: int, y: int, size: int) -> np.ndarray:
    with openslide.OpenSlide(path) as s:
        return np.asarray(s.read_region((x, y), 0, (size, size)).convert("RGB"))


def thumb(path: str, px: int) -> np.ndarray:
    with openslide.OpenSlide(path) as s:
        return np.asarray(s.get_thumbnail((px, px)).convert("RGB"))


def overlay(he: np.ndarray, truth: dict, markers: list[str]) -> np.ndarray:
    out = he.copy()
    for k, m in enumerate(markers):
        mask = load_mask(truth, m).astype(np.uint8)
        mask = cv2.resize(mask, (he.shape[1], he.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, COLOURS[k % 4], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-px", type=int, default=6144)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "phantom_gallery.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(tmp, "gallery", args.seed, size_px=args.size_px)
        truth = load_truth(case)
        markers = list(truth["markers"])
        he_path = truth["he"]["path"]
        thumbs = [thumb(he_path, 600)] + [thumb(truth["markers"][m]["ihc"]["path"], 600)
                                          for m in markers]
        row1 = thumbs + [overlay(thumbs[0], truth, markers)]
        titles1 = ["H&E"] + [f"IHC {m}" for m in markers] + [
            "masks: " + ", ".join(f"{m} ({'red green blue orange'.split()[k]})"
                                  for k, m in enumerate(markers))]
        t = args.tile_px
        stem = max(truth["stem_regions"], key=lambda r: len(r["markers"]))
        lymph = truth["lymphoid_regions"][0]
        tissue = load_mask(truth, "tissue")
        ds = truth["mask_downsample"]
        stem_mask = np.zeros_like(tissue)
        for r in truth["stem_regions"] + truth["lymphoid_regions"]:
            cv2.circle(stem_mask.view(np.uint8), (int(r["x"] / ds), int(r["y"] / ds)),
                       int(r["radius"] * 1.6 / ds), 1, -1)
        iy, ix = np.argwhere(tissue & ~stem_mask)[len(np.argwhere(tissue & ~stem_mask)) // 3]
        spots = [(stem["x"], stem["y"]), (lymph["x"], lymph["y"]), (ix * ds, iy * ds)]
        titles2 = ["H&E stem-like (" + "+".join(stem["markers"]) + ")",
                   "H&E lymphoid (distractor)", "H&E tumour / stroma"]
        only = [r for r in truth["stem_regions"] if r["markers"] == ["CD44"]]
        if only:
            spots.insert(1, (only[0]["x"], only[0]["y"]))
            titles2.insert(1, "H&E CD44 only (vesicular, halo)")
        row2 = [read(he_path, int(x - t / 2), int(y - t / 2), t) for x, y in spots]
        c = int(64 / truth["he"]["mpp"])  # 64 um crops, enlarged
        crops = [cv2.resize(tile[(t - c) // 2:(t + c) // 2, (t - c) // 2:(t + c) // 2], (t, t),
                            interpolation=cv2.INTER_NEAREST) for tile in row2]
        crop_titles = [f"64 um: {title[4:]}" for title in titles2]
        for m in markers:
            cx, cy = he_to_ihc(truth, m, np.array([[stem["x"], stem["y"]]]))[0]
            row2.append(read(truth["markers"][m]["ihc"]["path"], int(cx - t / 2),
                             int(cy - t / 2), t))
            titles2.append(f"IHC {m}, same region")
    row3, titles3 = crops, crop_titles
    row4, titles4 = [], []
    for name in ("high-nuclei-score-level0", "tissue-level0-4302-10273-4814-10785",
                 "medium-nuclei-score-level0"):
        path = REAL / "he-tiles" / f"{name}.png"
        if path.is_file():
            row4.append(np.asarray(Image.open(path).convert("RGB"))[:512, :512])
            titles4.append(f"real H&E: {name[:24]}")
    row4.append(data.immunohistochemistry())
    titles4.append("real IHC (skimage, DAB)")
    rows = [(row1, titles1), (row2, titles2), (row3, titles3), (row4, titles4)]
    cols = max(len(row) for row, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 13.5))
    for r, (row, titles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c])
                ax.set_title(titles[c], fontsize=8)
    fig.suptitle(f"histocsc phantom (seed {args.seed}, {args.size_px} px at "
                 f"{truth['he']['mpp']} um/px; tiles {t} px = {t * truth['he']['mpp']:.0f} um)"
                 " - row 4: real images for comparison", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    # A 256-colour palette keeps the PNG small enough for the repository.
    img = Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
