"""Heatmap quality over unseen phantom seeds: the whole CLI chain, per-seed and mean figures.

    python scripts/bench_heatmap.py [--seeds 201 202 203 204 205] [--size-px 4096]
        [--out bench-output/heatmap] [--overlap 0.5] [--until STAGE]

Per seed, each stage a fresh `histocsc` process, as a user would run them:
phantom (5 cases, SIZE px at 1 µm/px) -> prepare (64 px tiles at 2 µm/px, labels from the
registered IHC) -> train (configs/train-ci.yaml, tiny CNN) -> export -> infer (--overlap) on the
test case(s) -> evaluate against the phantom truth masks. A stage whose output exists is not
redone (delete the seed folder to start over). No seed here is used by a test; nothing is tuned to
one. Prints tile-level Dice (score-grid cells, truth >= 50 % of a cell), pixel-level Dice, test
AUROC and test ECE before/after temperature scaling, per seed, then mean and min, and the
acceptance verdict (tile Dice mean >= 0.8 and min >= 0.65, pixel Dice mean >= 0.75, AUROC >= 0.95,
ECE <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("phantom", "prepare", "train", "export", "infer", "evaluate")
TILES_YAML = "tile_px: 64\nmpp: 2.0\nstride_px: 32\nmin_tissue_fraction: 0.5\n"
FLOORS = {"tile_dice_mean": 0.8, "tile_dice_min": 0.65, "pixel_dice_mean": 0.75,
          "auroc_min": 0.95, "ece_after_max": 0.05}


def histocsc(*args: str, log: Path) -> None:
    """Run one `histocsc` command in a fresh process; its output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    with log.open("a") as f:
        f.write(f"$ histocsc {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "histocsc", *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode:
        sys.exit(f"histocsc {args[0]} failed (exit {done.returncode}); see {log}")


def test_cases(cohort_csv: Path) -> list[tuple[str, Path]]:
    """(case, H&E path) of the cases the training split holds out for test."""
    from histocsc.cohort import read_cohort

    cases = read_cohort(cohort_csv).cases
    chosen = [c for c in cases if c.split == "test"] or cases[-1:]
    return [(c.case, c.he) for c in chosen]


def run_seed(seed: int, root: Path, size_px: int, overlap: float, epochs: int,
             until: str) -> dict[str, object] | None:
    """Every stage for one seed; the figures, or None when stopped before evaluate."""
    d = root / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "log.txt"
    timings: dict[str, float] = {}
    steps = {
        "phantom": (d / "phantom" / "cohort.csv",
                    ["phantom", str(d / "phantom"), "--cases", "5", "--size-px", str(size_px),
                     "--slide-mpp", "1.0", "--seed", str(seed)]),
        "prepare": (d / "prepared" / "summary.json",
                    ["prepare", "--cohort", str(d / "phantom" / "cohort.csv"),
                     "--out", str(d / "prepared"), "--tiles-config", str(d / "tiles.yaml")]),
        "train": (d / "run" / "test_metrics.json",
                  ["train", "--config", str(ROOT / "configs" / "train-ci.yaml"),
                   "--data", str(d / "prepared"), "--out", str(d / "run"),
                   "--set", f"seed={seed}", "--set", f"trainer.max_epochs={epochs}",
                   "--set", "trainer.progress_bar=false"]),
        "export": (d / "model.onnx", ["export", str(d / "run"), "--out", str(d / "model.onnx")]),
    }
    (d / "tiles.yaml").write_text(TILES_YAML)
    for stage, (marker_file, args) in steps.items():
        if not marker_file.exists():
            t0 = time.perf_counter()
            histocsc(*args, log=log)
            timings[stage] = round(time.perf_counter() - t0, 1)
        if stage == until:
            return None
    cases = test_cases(d / "phantom" / "cohort.csv")
    infer_dir = d / f"infer-overlap{overlap:g}"
    t0 = time.perf_counter()
    histocsc("infer", *(str(he) for _, he in cases), "--model", str(d / "model.onnx"),
             "--out", str(infer_dir), "--overlap", str(overlap), "--device", "cpu", log=log)
    timings["infer"] = round(time.perf_counter() - t0, 1)
    if until == "infer":
        return None
    per_case = []
    for case, he in cases:
        ev = d / f"eval-overlap{overlap:g}" / case
        histocsc("evaluate", str(infer_dir / he.stem), "--truth", str(d / "phantom" / case),
                 "--out", str(ev), log=log)
        per_case.append(json.loads((ev / "evaluation.json").read_text()))
    test = json.loads((d / "run" / "test_metrics.json").read_text())
    figures: dict[str, object] = {"seed": seed, "timings_s": timings, "markers": {}}
    for marker in per_case[0]["markers"]:
        rows = [e["markers"][marker] for e in per_case]
        figures["markers"][marker] = {  # type: ignore[index]
            "tile_dice": min(r["tile"]["dice"] for r in rows),
            "pixel_dice": min(r["pixel"]["dice"] for r in rows),
            "heatmap_auroc": min(r["tile"]["auroc"] for r in rows),
            "test_auroc": test[marker]["auroc"],
            "ece_before": test[marker]["ece_uncalibrated"],
            "ece_after": test[marker]["ece"],
            "temperature": test[marker].get("temperature"),
        }
    (d / f"figures-overlap{overlap:g}.json").write_text(json.dumps(figures, indent=1))
    return figures


def report(all_figures: list[dict[str, object]]) -> bool:
    """Print per-seed and mean/min figures; True when every acceptance floor holds."""
    keys = ("tile_dice", "pixel_dice", "heatmap_auroc", "test_auroc", "ece_before", "ece_after")
    markers = list(all_figures[0]["markers"])  # type: ignore[arg-type]
    ok = True
    for marker in markers:
        print(f"\n{marker} (machine loaded)")
        print("seed   " + "  ".join(f"{k:>13}" for k in keys))
        cols: dict[str, list[float]] = {k: [] for k in keys}
        for fig in all_figures:
            row = fig["markers"][marker]  # type: ignore[index]
            for k in keys:
                cols[k].append(float(row[k]))
            print(f"{fig['seed']:<6} " + "  ".join(f"{float(row[k]):13.3f}" for k in keys))
        mean = {k: sum(v) / len(v) for k, v in cols.items()}
        low = {k: min(v) for k, v in cols.items()}
        high = {k: max(v) for k, v in cols.items()}
        print("mean   " + "  ".join(f"{mean[k]:13.3f}" for k in keys))
        print("min    " + "  ".join(f"{low[k]:13.3f}" for k in keys))
        checks = {
            f"tile Dice mean {mean['tile_dice']:.3f} >= 0.8": mean["tile_dice"] >= 0.8,
            f"tile Dice min {low['tile_dice']:.3f} >= 0.65": low["tile_dice"] >= 0.65,
            f"pixel Dice mean {mean['pixel_dice']:.3f} >= 0.75": mean["pixel_dice"] >= 0.75,
            f"test AUROC min {low['test_auroc']:.3f} >= 0.95": low["test_auroc"] >= 0.95,
            f"ECE after max {high['ece_after']:.3f} <= 0.05": high["ece_after"] <= 0.05,
        }
        for text, passed in checks.items():
            print(f"  {'PASS' if passed else 'FAIL'} {text}")
            ok &= passed
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203, 204, 205])
    ap.add_argument("--size-px", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-output" / "heatmap")
    ap.add_argument("--until", choices=STAGES, default="evaluate")
    args = ap.parse_args()
    figures = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        fig = run_seed(seed, args.out, args.size_px, args.overlap, args.epochs, args.until)
        print(f"seed {seed}: {args.until} reached in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if fig is not None:
            figures.append(fig)
    if figures:
        ok = report(figures)
        print(f"\n{'ALL PASS' if ok else 'SOME FAIL'} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
