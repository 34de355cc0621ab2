"""int8 vs fp32: AUROC on a held-out phantom case and speed, in one run.

    python scripts/bench_int8.py [--out bench-output/int8]

Writes a phantom cohort (5 cases, 3 train / 1 val / 1 test; 2560 px at 1 µm/px), tiles it at
64 px / 2 µm/px labelled from the truth masks (`prepare_from_truth`), trains the tiny CNN with
`histocsc train`'s own code (configs/train-ci.yaml), exports it with `export_onnx` (fp32 + static
QDQ int8 calibrated on training tiles), then prints per-marker AUROC of both graphs on the test
case and their tiles/s on the test tiles. Target: AUROC within 0.01. The speed-up for ResNet-18
at 224 px is measured by scripts/bench_infer.py.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

ROOT = Path(__file__).resolve().parents[1]


def test_case(prepared: Path, case: str, markers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of one prepared case and their labels (N, markers; -1 ignored)."""
    tiles = np.load(prepared / case / "tiles.npy")
    with (prepared / case / "labels.csv").open() as f:
        labels = np.array([[int(r[f"{m}_label"]) for m in markers] for r in csv.DictReader(f)])
    return tiles, labels


def speed(path: Path, tiles: np.ndarray, seconds: float = 5.0, batch: int = 256) -> float:
    from histocsc.predict.engine import Engine

    engine = Engine(path, device="cpu")
    reps = np.concatenate([tiles] * max(1, batch // len(tiles) + 1))[:batch]
    engine.predict(reps)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.predict(reps)
        n += len(reps)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-output" / "int8")
    args = parser.parse_args()

    from histocsc.learn.export import export_onnx
    from histocsc.learn.model import load_trained
    from histocsc.learn.train import load_train_config, train
    from histocsc.predict.engine import Engine
    from histocsc.synthetic.generate import make_cohort
    from histocsc.synthetic.truth_prep import prepare_from_truth
    from histocsc.wsi.grid import TilesConfig

    t0 = time.perf_counter()
    phantom, prepared = args.out / "phantom", args.out / "prepared"
    if not (phantom / "cohort.csv").is_file():
        make_cohort(phantom, 5, size_px=2560, mpp=1.0, seed=6)
    if not (prepared / "cohort.csv").is_file():
        cfg = TilesConfig(tile_px=64, mpp=2.0, stride_px=32, min_tissue_fraction=0.5)
        prepare_from_truth(phantom, prepared, cfg)
    print(f"phantom + tiles: {time.perf_counter() - t0:.1f} s")
    cfg = load_train_config(ROOT / "configs" / "train-ci.yaml", {
        "data.root": str(prepared), "out": str(args.out / "run"), "trainer.progress_bar": False})
    result = train(cfg, run_dir=args.out / "run")
    model, meta = load_trained(result.run_dir)
    markers = list(meta["markers"])
    exported = export_onnx(model, meta, args.out / "tiny.onnx", int8=True,
                           calibration=prepared / "case000" / "tiles.npy")
    x_test, y_test = test_case(prepared, "case004", markers)
    probs = {name: Engine(path, device="cpu").predict(x_test)
             for name, path in (("fp32", exported.fp32), ("int8", exported.int8))}
    for j, m in enumerate(markers):
        keep = y_test[:, j] >= 0
        target = torch.from_numpy(y_test[keep, j])
        a32, a8 = (float(binary_auroc(torch.from_numpy(probs[k][keep, j]), target))
                   for k in ("fp32", "int8"))
        print(f"{m}: AUROC fp32 {a32:.4f}, int8 {a8:.4f}, change {a8 - a32:+.4f} "
              f"(target |change| <= 0.01); {int(target.sum())} positive of {len(target)} tiles")
    diff = np.abs(probs["fp32"] - probs["int8"])
    print(f"|int8 - fp32| probability: mean {diff.mean():.4f}, max {diff.max():.4f}")
    s32, s8 = speed(exported.fp32, x_test), speed(exported.int8, x_test)
    print(f"speed on 64 px tiles: fp32 {s32:.0f} tiles/s, int8 {s8:.0f} tiles/s, "
          f"speed-up {s8 / s32:.2f}x (ResNet-18 at 224 px: scripts/bench_infer.py)")


if __name__ == "__main__":
    main()
