"""Cell labels: detection against the phantom's drawn cells, real IHC pictures, and the time of
`prepare` with cell labels against pixel-fraction labels.

    python scripts/bench_labels.py [--skip phantom,real,prepare] [--seeds 9101,9102,9103]
                                   [--size-px 2048] [--prepare-px 8192] [--out /tmp/bench_labels]

- phantom: per seed (no test uses these) and marker (CD44 membrane, Ki67 nuclear, pan-CK
  cytoplasm), each IHC as drawn, with a background tint, with stain jitter, and with both:
  detection recall (drawn nuclei not fused with another, matched one-to-one within 4 µm) and
  precision (detections matching any drawn nucleus), and the median absolute error of the
  positive-cell fraction of 64 µm tiles (>= 10 drawn cells) against the drawn truth.
- real: skimage.data.immunohistochemistry() and the two IHC JPEGs of ../shared/data/real/
  registration with the detected cells drawn (PNG in --out, to look at), and the positive-cell
  fraction of regions ranked by eye.
- prepare: `prepare` of one phantom case (--prepare-px square, CD44) with pixel-fraction labels,
  then with cell labels (rule positive_cells), in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

from histocsc.ihc.cells import classify, compartment_for, detect_cells, segment
from histocsc.ihc.deconvolution import named_stains, unmix
from histocsc.ihc.label_config import LabelConfig
from histocsc.ihc.labels import slide_background
from histocsc.synthetic.generate import make_case
from histocsc.synthetic.truth import load_truth
from histocsc.wsi.optical_density import optical_density
from histocsc.wsi.slide import open_slide

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "registration"
MARKERS = ("CD44", "Ki67", "pan-CK")
MATCH_UM, TILE_UM, MIN_TILE_CELLS = 4.0, 64.0, 10


def match(a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """One-to-one pairs (i in a, j in b) within `radius`, closest first (greedy)."""
    if not len(a) or not len(b):
        return np.zeros((0, 2), int)
    sp = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="coo_matrix")
    used_a, used_b, pairs = np.zeros(len(a), bool), np.zeros(len(b), bool), []
    for k in np.argsort(sp.data, kind="stable"):
        i, j = sp.row[k], sp.col[k]
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            pairs.append((i, j))
    return np.array(pairs, int).reshape(-1, 2)


def vary(rgb: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """The IHC with a beige background tint over its tissue and / or jittered stain amounts."""
    if how == "as drawn":
        return rgb
    stains = named_stains("H-DAB")
    od = optical_density(rgb)
    amounts = unmix(od, stains)
    tissue = od.sum(-1) > 0.15
    if "jitter" in how:
        amounts[..., 0] *= rng.uniform(0.8, 1.25)
        amounts[..., 1] *= rng.uniform(0.8, 1.25)
    if "tint" in how:
        amounts[..., 1] += np.where(tissue, rng.uniform(0.06, 0.12), 0.0)
    od = amounts.reshape(-1, 3) @ stains.vectors
    return np.clip(255 * 10 ** (-od.reshape(rgb.shape)), 0, 255).round().astype(np.uint8)


def tile_fractions(xy, positive, size_px, tile_px):
    """Positive share and count of cells per square tile of `tile_px` (IHC px)."""
    nx = int(size_px // tile_px)
    i = np.clip((xy[:, 0] // tile_px).astype(int), 0, nx - 1)
    j = np.clip((xy[:, 1] // tile_px).astype(int), 0, nx - 1)
    n = np.bincount(j * nx + i, minlength=nx * nx)
    p = np.bincount(j * nx + i, weights=positive.astype(float), minlength=nx * nx)
    with np.errstate(invalid="ignore", divide="ignore"):
        return p / n, n


def phantom(seeds: list[int], size_px: int, out: Path) -> None:
    print(f"\n## phantom: {len(seeds)} seeds x {MARKERS}, {size_px} px at 0.5 µm/px")
    cfg = LabelConfig()
    rows: dict[str, list] = {}
    for seed in seeds:
        case = out / f"ph{seed}"
        if not (case / "truth.json").is_file():
            make_case(out, case.name, seed=seed, size_px=size_px, markers=MARKERS,
                      cell_truth=True)
        truth = load_truth(case)
        rng = np.random.default_rng(seed)
        for marker in MARKERS:
            info = truth["markers"][marker]
            cells = np.loadtxt(case / info["cells"], delimiter=",", skiprows=1, ndmin=2)
            with open_slide(case / info["ihc"]["path"]) as slide:
                rgb, mpp = slide.read(0, 0, *slide.dimensions), slide.mpp
            comp = compartment_for(marker, None)
            for how in ("as drawn", "tint", "jitter", "tint+jitter"):
                img = vary(rgb, how, rng)
                found = detect_cells(img, mpp, cfg.cells, comp == "nuclear",
                                     slide_background(img[::4, ::4], cfg))
                xy = np.column_stack([found.x, found.y])
                pos = classify(found, comp, cfg.cells) > 0
                sep = cells[:, 8] > 0
                rec = len(match(cells[sep, :2], xy, MATCH_UM / mpp)) / max(1, sep.sum())
                prec = len(match(cells[:, :2], xy, MATCH_UM / mpp)) / max(1, len(xy))
                tf, tn = tile_fractions(cells[:, :2], cells[:, 5] > 0, size_px, TILE_UM / mpp)
                df, _ = tile_fractions(xy, pos, size_px, TILE_UM / mpp)
                ok = (tn >= MIN_TILE_CELLS) & np.isfinite(df)
                err = np.abs(df - tf)
                mae = float(np.median(err[ok])) if ok.any() else float("nan")
                some = ok & (tf > 0)  # tiles holding positive cells: the zeros do not help
                mae_pos = float(np.median(err[some])) if some.any() else float("nan")
                rows.setdefault(f"{marker:7s} {how:12s}", []).append(
                    (rec, prec, mae, mae_pos, ok.sum(), some.sum()))
    print("marker  variant        recall  precision  tile MAE (tiles)  MAE on tiles with "
          "positive cells (tiles)   worst seed")
    for key, vals in rows.items():
        r, p, m, mp, n, npos = np.array(vals).T
        print(f"{key}  {r.mean():.3f}   {p.mean():.3f}      {m.mean():.3f} ({int(n.sum())})"
              f"      {np.nanmean(mp):.3f} ({int(npos.sum())})"
              f"     recall {r.min():.3f} precision {p.min():.3f} MAE {m.max():.3f}")


def draw(rgb: np.ndarray, nuclei: np.ndarray, classes: np.ndarray, xy: np.ndarray,
         scale: int = 1) -> np.ndarray:
    """The image beside itself with nucleus outlines (green) and a dot per cell (blue
    negative, yellow / orange / red 1+ / 2+ / 3+), enlarged `scale` times."""
    from skimage.segmentation import find_boundaries

    big = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    out = big.copy()
    edge = cv2.resize(find_boundaries(nuclei).astype(np.uint8), None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_NEAREST) > 0
    out[edge] = (0, 200, 0)
    colours = [(40, 90, 230), (250, 220, 40), (250, 140, 20), (200, 0, 0)]
    for (x, y), k in zip(xy * scale, classes, strict=True):
        cv2.circle(out, (int(x), int(y)), max(1, scale), colours[int(k)], -1)
    return np.concatenate([big, out], axis=1)


# regions ranked by eye, most positive first: (name, x0, y0, x1, y1) in image px
REAL_REGIONS = {
    "colon (skimage)": [("gland, top left", 0, 0, 250, 180),
                        ("small gland + stroma, bottom", 240, 300, 400, 512),
                        ("stroma, centre", 100, 190, 300, 300)],
    "kidney pan-CK": [("medulla (dark brown)", 200, 270, 620, 380),
                      ("cortex", 430, 480, 860, 640)],
    "lung proSPC": [("lesion, brown outer ring", 227, 340, 340, 510),
                    ("lesion, blue centre", 380, 290, 510, 400),
                    ("alveolar parenchyma", 25, 510, 135, 680)],
}


def real(out: Path) -> None:
    import skimage.data
    from PIL import Image

    print("\n## real IHC (pictures in", out, ")")
    images = {"colon (skimage)": (skimage.data.immunohistochemistry(), 0.5, "cytoplasm", 2)}
    for name, file, comp in (("kidney pan-CK", "Rat-Kidney_PanCytokeratin.jpg", "cytoplasm"),
                             ("lung proSPC", "Izd2-29-041-w35_proSPC.jpg", "cytoplasm")):
        if (REAL / file).is_file():
            images[name] = (np.asarray(Image.open(REAL / file).convert("RGB")), 5.0, comp, 1)
        else:
            print(f"{name}: {REAL / file} absent, skipped")
    cfg = LabelConfig()
    for name, (rgb, mpp, comp, scale) in images.items():
        background = slide_background(rgb, cfg)
        nuclei, cells, dab = segment(rgb, mpp, cfg.cells, comp == "nuclear", background)
        from histocsc.ihc.cells import measure

        found = measure(nuclei, cells, dab, mpp, cfg.cells)
        cls = classify(found, comp, cfg.cells)
        path = out / f"cells_{name.split()[0]}.png"
        picture = draw(rgb, nuclei, cls, np.column_stack([found.x, found.y]), scale)
        cv2.imwrite(str(path), picture[..., ::-1])
        print(f"{name} ({mpp} µm/px, {comp}): {len(found)} cells, {np.mean(cls > 0):.0%} "
              f"positive -> {path}")
        fractions = []
        for region, x0, y0, x1, y1 in REAL_REGIONS[name]:
            inside = (found.x >= x0) & (found.x < x1) & (found.y >= y0) & (found.y < y1)
            fractions.append(float(np.mean(cls[inside] > 0)) if inside.any() else float("nan"))
            print(f"  {region}: {inside.sum()} cells, {fractions[-1]:.0%} positive")
        if fractions:
            kept = all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
            print(f"  order by eye kept: {kept}")


def prepare_timing(size_px: int, out: Path) -> None:
    """`prepare` of one phantom case with pixel-fraction labels, then with cell labels."""
    from histocsc.pipeline.prepare import StageConfigs, run_cohort
    from histocsc.synthetic.generate import make_cohort

    root = out / f"prep{size_px}"
    cohort = root / "phantom" / "cohort.csv"
    if not cohort.is_file():
        t0 = time.perf_counter()
        make_cohort(root / "phantom", 1, size_px=size_px, mpp=0.5, markers=("CD44",), seed=9301)
        print(f"phantom {size_px} px written in {time.perf_counter() - t0:.1f} s")
    print(f"\n## prepare, one {size_px} x {size_px} px case at 0.5 µm/px (CD44), "
          f"load {os.getloadavg()[0]:.2f}")
    times = {}
    for name, label in (("pixel_fraction", LabelConfig()),
                        ("positive_cells", LabelConfig(rule="positive_cells"))):
        t0 = time.perf_counter()
        (summary,) = run_cohort(cohort, root / f"out-{name}", StageConfigs(label=label),
                                force=True)
        times[name] = time.perf_counter() - t0
        qc = summary["markers"]["CD44"]
        print(f"{name:15s} {times[name]:6.1f} s  (status {summary['status']}; labels "
              f"+{qc['positive']} / -{qc['negative']} / ignored {qc['ignored']})")
    ratio = times["positive_cells"] / times["pixel_fraction"]
    print(f"cell labels / pixel-fraction labels: {ratio:.2f}x the whole prepare time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip", default="", help="comma-separated: phantom,real,prepare")
    parser.add_argument("--seeds", default="9101,9102,9103")
    parser.add_argument("--size-px", type=int, default=2048)
    parser.add_argument("--prepare-px", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_labels"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if "phantom" not in skip:
        phantom([int(s) for s in args.seeds.split(",")], args.size_px, args.out)
    if "real" not in skip:
        real(args.out)
    if "prepare" not in skip:
        prepare_timing(args.prepare_px, args.out)


if __name__ == "__main__":
    main()
