"""Write phantom cases (H&E + one IHC per marker, truth.json, masks) and a cohort.csv."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histocsc.errors import ConfigError
from histocsc.io import atomic_path, write_json
from histocsc.synthetic.cells import (
    TRUTH_COLUMNS,
    ihc_cell_truth,
    marker_compartment,
    vessel_distance,
)
from histocsc.synthetic.layout import Layout, make_layout
from histocsc.synthetic.render import Section, SectionRenderer
from histocsc.synthetic.transform import random_transform
from histocsc.synthetic.truth import TRUTH_NAME
from histocsc.wsi.pyramid import write_pyramid_tiff

DEFAULT_MARKERS = ("CD133", "CD44")
TILE = 256
QUALITY = 90
N_LANDMARKS = 64
Advance = Callable[[int], None]


def case_name(i: int) -> str:
    """Folder and slide-name prefix of case i."""
    return f"case{i:03d}"


def tiles_per_case(size_px: int, n_markers: int) -> int:
    """Tiles written per case (for progress bars)."""
    return (1 + n_markers) * math.ceil(size_px / TILE) ** 2


def _check(size_px: int, mpp: float, markers: Sequence[str]) -> None:
    if size_px < 512:
        raise ConfigError(f"phantom: --size-px must be at least 512, got {size_px}")
    if not 0.05 <= mpp <= 10:
        raise ConfigError(f"phantom: --slide-mpp must be between 0.05 and 10, got {mpp}")
    if not markers or len(set(markers)) != len(markers):
        raise ConfigError(f"phantom: markers must be distinct and non-empty, got {list(markers)}")
    for m in markers:
        if not m or not m.replace("-", "").replace("_", "").isalnum() or m.lower() in (
            "case", "he", "split"
        ):
            raise ConfigError(f"phantom: bad marker name {m!r}")


def make_case(
    out_dir: str | Path,
    case: str,
    seed: int,
    size_px: int = 8192,
    mpp: float = 0.5,
    markers: Sequence[str] = DEFAULT_MARKERS,
    advance: Advance | None = None,
    workers: int = 3,
    fill_frame: bool = False,
    cell_truth: bool = False,
) -> Path:
    """Write one case into `out_dir/case/`; returns the folder. Same seed, same bytes.

    `fill_frame`: tissue fills the whole frame (see `make_layout`). `cell_truth`: also write
    every IHC nucleus drawn (`cells_<M>.csv`, see `write_cell_truth`).
    """
    markers = tuple(markers)
    _check(size_px, mpp, markers)
    case_dir = Path(out_dir) / case
    case_dir.mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence([int(seed), 0x5EC7])
    layout_seed, *section_seeds = ss.generate_state(2 + 2 * len(markers), dtype=np.uint32)
    rng = np.random.default_rng(int(layout_seed))
    layout = make_layout(rng, size_px, size_px, mpp, markers, fill_frame=fill_frame)
    layout.sample(np.zeros(1, np.float32), np.zeros(1, np.float32))  # build caches before threads
    he_name = f"{case}_HE.tiff"
    jobs = [(case_dir / he_name, Section("he", int(section_seeds[0])))]
    truth: dict[str, Any] = {
        "format": "histocsc-phantom/1",
        "case": case,
        "seed": int(seed),
        "he": {"path": he_name, "width": size_px, "height": size_px, "mpp": mpp},
        "mask_downsample": layout.ds,
        "tissue_mask": "mask_tissue.png",
        "markers": {},
        "stem_regions": [
            {"x": r.x, "y": r.y, "radius": r.radius, "markers": list(r.markers)}
            for r in layout.stem_regions
        ],
        "lymphoid_regions": [{"x": r.x, "y": r.y, "radius": r.radius}
                             for r in layout.lymph_regions],
        "vessels": [{"x": v[0], "y": v[1], "rx": v[2], "ry": v[3], "angle_rad": v[4]}
                    for v in layout.vessels.tolist()],
    }
    _write_mask(case_dir / "mask_tissue.png", layout.fields["tissue"] > 0)
    centre = (size_px / 2, size_px / 2)
    for k, marker in enumerate(markers):
        trng = np.random.default_rng(int(section_seeds[1 + len(markers) + k]))
        tf = random_transform(trng, centre, centre, mpp)
        name = f"{case}_{marker}.tiff"
        jobs.append((case_dir / name, Section("ihc", int(section_seeds[1 + k]), marker, tf)))
        mask_name = f"mask_{marker}.png"
        _write_mask(case_dir / mask_name, layout.mask(marker))
        pts, kinds = landmark_points(layout, trng)
        truth["markers"][marker] = {
            "ihc": {"path": name, "width": size_px, "height": size_px, "mpp": mpp},
            "mask": mask_name,
            "positive_fraction_of_tissue": _fraction(layout, marker),
            "transform": tf.to_dict(),
            "landmarks": np.concatenate([pts, tf.forward(pts)], 1).round(3).tolist(),
            "landmark_features": kinds,
            "compartment": marker_compartment(marker),
        }
        if cell_truth:
            cells_name = f"cells_{marker}.csv"
            write_cell_truth(case_dir / cells_name, layout, int(section_seeds[1 + k]), marker,
                             tf.forward, (size_px, size_px))
            truth["markers"][marker]["cells"] = cells_name
    # Slides render in threads: OpenCV and large numpy operations release the GIL.
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        done = [pool.submit(_write_slide, path, layout, sec, advance) for path, sec in jobs]
        for fut in done:
            fut.result()
    write_json(case_dir / TRUTH_NAME, truth)
    return case_dir


def _write_slide(path: Path, layout: Layout, section: Section, advance: Advance | None) -> None:
    renderer = SectionRenderer(layout, section)

    def read_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        block = renderer.read_tile(y, x, h, w)
        if advance is not None:
            advance(1)
        return block

    stain = "H&E" if section.kind == "he" else f"IHC {section.marker} (DAB + hematoxylin)"
    write_pyramid_tiff(path, layout.height, layout.width, read_tile, layout.mpp, tile=TILE,
                       quality=QUALITY, description=f"histocsc phantom {stain}")


def write_cell_truth(path: Path, layout: Layout, seed: int, marker: str, forward,
                     size: tuple[int, int]) -> None:
    """cells_<M>.csv: one row per IHC nucleus drawn: x, y (IHC level-0 px), he_x, he_y (H&E),
    kind (histocsc.synthetic.cells: 1 stem-like ... 5 endothelial), positive (0/1), intensity
    (its DAB strength 0.35-1, 0 when negative), radius (nucleus, IHC px), separate (0/1: not
    fused with another nucleus; see `ihc_cell_truth`)."""
    table = ihc_cell_truth(layout, seed, marker, forward, size)
    with atomic_path(path) as tmp:
        np.savetxt(tmp, table, fmt=["%.2f"] * 4 + ["%d", "%d", "%.3f", "%.2f", "%d"], delimiter=",",
                   header=",".join(TRUTH_COLUMNS), comments="")


def _write_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")


def _fraction(layout: Layout, marker: str) -> float:
    tissue = layout.fields["tissue"] > 0
    return round(float(layout.mask(marker).sum()) / max(1, int(tissue.sum())), 5)


def landmark_points(layout: Layout, rng: np.random.Generator,
                    n: int = N_LANDMARKS) -> tuple[np.ndarray, list[str]]:
    """H&E points on tissue features: lumen centres, stem-region centres, tissue interior
    (outside lumina)."""
    pts = [layout.vessels[:, :2]] if len(layout.vessels) else []
    kinds = ["lumen"] * len(layout.vessels)
    stems = np.array([[r.x, r.y] for r in layout.stem_regions]).reshape(-1, 2)
    pts.append(stems)
    kinds += ["stem"] * len(stems)
    need = max(0, n - sum(len(p) for p in pts))
    tissue = layout.fields["tissue"]
    ok = np.argwhere(tissue > 0.15)
    if need and len(ok):
        pick = ok[rng.choice(len(ok), size=4 * need, replace=len(ok) < 4 * need)]
        cand = (pick[:, ::-1] + 0.5) * layout.ds
        xy = cand.astype(np.float32)
        ids = np.arange(len(layout.vessels))
        clear = vessel_distance(layout, ids, xy[:, 0], xy[:, 1]) > 1.4  # not in a lumen
        cand = np.concatenate([cand[clear], cand[~clear]])[:need]
        pts.append(cand)
        kinds += ["tissue"] * need
    return np.concatenate(pts).astype(np.float64), kinds


def splits(n: int) -> list[str]:
    """Deterministic split per case: ~20% test (last), ~10% val, rest train; N=5 -> 3/1/1."""
    if n <= 1:
        return ["train"] * n
    n_test = max(1, round(0.2 * n))
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    return ["train"] * (n - n_test - n_val) + ["val"] * n_val + ["test"] * n_test


def make_cohort(
    out_dir: str | Path,
    cases: int,
    size_px: int = 8192,
    mpp: float = 0.5,
    markers: Sequence[str] = DEFAULT_MARKERS,
    seed: int = 0,
    advance: Advance | None = None,
    fill_frame: bool = False,
) -> Path:
    """Write `cases` cases and `out_dir/cohort.csv`; returns the CSV path."""
    if cases < 1:
        raise ConfigError(f"phantom: --cases must be at least 1, got {cases}")
    markers = tuple(markers)
    _check(size_px, mpp, markers)
    out_dir = Path(out_dir)
    case_seeds = np.random.SeedSequence(int(seed)).generate_state(cases, dtype=np.uint32)
    rows = []
    for i, split in enumerate(splits(cases)):
        name = case_name(i)
        make_case(
            out_dir, name, int(case_seeds[i]), size_px, mpp, markers, advance,
            fill_frame=fill_frame,
        )  # fmt: skip
        row = {"case": name, "he": f"{name}/{name}_HE.tiff"}
        row.update({m: f"{name}/{name}_{m}.tiff" for m in markers})
        row["split"] = split
        rows.append(row)
    csv_path = out_dir / "cohort.csv"
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "he", *markers, "split"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
