"""int8 vs fp32: AUROC on a phantom test case and speed, in one run.

    python scripts/bench_int8.py [--out bench-output/int8] [--steps 600]

Writes small phantom cases (two to train, one to test; 2560 px at 1 µm/px), quickly trains a
small CNN on 64 px tiles at 2 µm/px labelled from the truth masks (positive when at least half
the tile is marker-positive), exports it with `export_onnx` (fp32 + static QDQ int8 calibrated
on training tiles), then prints per-marker AUROC of both graphs on the test case and their
tiles/s on the test tiles. Target: AUROC within 0.01. The speed-up for ResNet-18 at 224 px is
measured by scripts/bench_infer.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ["CD133", "CD44"]
TILE_PX, MPP = 64, 2.0


class SmallNet(nn.Module):
    """Three strided convolutions, mean+max pooling, one logit per marker."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(64, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def case_tiles(case_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of a phantom H&E and the truth positive fraction per marker."""
    from histocsc.synthetic.truth import load_truth, truth_labels
    from histocsc.wsi.grid import TilesConfig, make_grid
    from histocsc.wsi.slide import open_slide

    truth = load_truth(case_dir)
    with open_slide(case_dir / truth["he"]["path"]) as slide:
        grid = make_grid(slide, TilesConfig(tile_px=TILE_PX, mpp=MPP))
        t = grid.table
        tiles = np.stack([slide.read(t["x"][i], t["y"][i], t["w"][i], t["h"][i],
                                     out_size=(TILE_PX, TILE_PX)) for i in range(len(grid))])
    return tiles, np.stack([truth_labels(truth, m, grid) for m in MARKERS], 1)


def train(tiles: np.ndarray, labels: np.ndarray, steps: int) -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    mean = (tiles.reshape(-1, 3).mean(0) / 255).tolist()
    std = (tiles.reshape(-1, 3).std(0) / 255).tolist()
    x = torch.from_numpy(tiles).float().div(255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.from_numpy((labels >= 0.5).astype(np.float32))
    x, y = torch.cat([x, x.flip(3), x.flip(2)]), torch.cat([y, y, y])
    model = SmallNet(len(MARKERS))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        xb = x[idx] * (1 + 0.15 * torch.randn(64, 3, 1, 1)) + 0.3 * torch.randn(64, 3, 1, 1)
        loss = nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), mean, std


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()

    import onnxruntime as ort

    from histocsc.learn.export import export_onnx
    from histocsc.synthetic.generate import make_case

    t0 = time.perf_counter()
    cases = {}
    for name, seed in (("train1", 7), ("train2", 8), ("test", 6)):
        folder = args.out / "phantom" / name
        cases[name] = folder if (folder / "truth.json").is_file() else make_case(
            args.out / "phantom", name, seed, size_px=2560, mpp=1.0)
    train_data = [case_tiles(cases[n]) for n in ("train1", "train2")]
    x_test, y_test = case_tiles(cases["test"])
    print(f"phantoms: {time.perf_counter() - t0:.1f} s; {sum(len(d[0]) for d in train_data)} "
          f"train tiles, {len(x_test)} test tiles")
    x_train = np.concatenate([d[0] for d in train_data])
    model, mean, std = train(x_train, np.concatenate([d[1] for d in train_data]), args.steps)
    meta = {"markers": MARKERS, "tile_px": TILE_PX, "mpp": MPP, "backbone": "small",
            "mean": mean, "std": std, "thresholds": {m: 0.5 for m in MARKERS}, "summary": {}}
    result = export_onnx(model, meta, args.out / "small.onnx", int8=True,
                         calibration=x_train[:: max(1, len(x_train) // 256)])
    probs = {}
    for name, path in (("fp32", result.fp32), ("int8", result.int8)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs[name] = sess.run(None, {"tiles": x_test})[0]
    for j, m in enumerate(MARKERS):
        pos = y_test[:, j] >= 0.5
        a32, a8 = auroc(probs["fp32"][:, j], pos), auroc(probs["int8"][:, j], pos)
        print(f"{m}: AUROC fp32 {a32:.4f}, int8 {a8:.4f}, change {a8 - a32:+.4f} "
              f"(target |change| <= 0.01); {int(pos.sum())} positive of {len(pos)} test tiles")
    diff = np.abs(probs["fp32"] - probs["int8"])
    print(f"|int8 - fp32| probability: mean {diff.mean():.4f}, max {diff.max():.4f}")
    s32, s8 = speed(result.fp32, x_test), speed(result.int8, x_test)
    print(f"speed on {TILE_PX} px tiles: fp32 {s32:.0f} tiles/s, int8 {s8:.0f} tiles/s, "
          f"speed-up {s8 / s32:.2f}x (ResNet-18 at 224 px: scripts/bench_infer.py)")


if __name__ == "__main__":
    main()
