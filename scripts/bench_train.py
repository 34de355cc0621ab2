"""Training throughput, in one run: the data pipeline alone (tiles/s per worker), training with
real tiles (images/s), training on synthetic in-memory tensors (the model's own limit), and the
ratio real / synthetic (on a GPU it should be at least 0.85).

    python scripts/bench_train.py --data PREPARED [--backbone resnet18] [--batch-size 128]
                                  [--workers 8] [--steps 60] [--precision auto] [--json OUT]
    python scripts/bench_train.py --phantom WORKDIR [--phantom-cases 4 --phantom-size 4096]
                                  [--tile-px 224 --mpp 0.5 --stride-px 112] ...

--phantom writes phantom slides into WORKDIR/phantom (unless there), tiles them and labels the
tiles from the truth masks into WORKDIR/prepared (unless there). Without --data or --phantom a
prepared cohort of random tiles is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from histocsc.learn.config import ModelConfig  # noqa: E402
from histocsc.learn.data import TileDataModule  # noqa: E402
from histocsc.learn.module import TileClassifier  # noqa: E402
from histocsc.learn.train import TrainConfig, resolve_precision  # noqa: E402

WARMUP = 5


def write_random_cohort(root: Path, cases: int, tiles: int, tile_px: int) -> Path:
    """A prepared cohort of random tiles (throughput only; nothing to learn)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * max(1, cases - 1) + ["val"]
    with (root / "cohort.csv").open("w") as f:
        f.write("case,he,CD133,CD44,split\n")
        for i, split in enumerate(splits):
            f.write(f"c{i},c{i}.tif,c{i}_a.tif,c{i}_b.tif,{split}\n")
    for i in range(len(splits)):
        case = root / f"c{i}"
        case.mkdir(exist_ok=True)
        np.save(case / "tiles.npy", rng.integers(0, 256, (tiles, tile_px, tile_px, 3), np.uint8))
        (case / "grid.json").write_text(json.dumps({"mpp": 0.5, "tile_px": tile_px}))
        with (case / "labels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y", "w", "h", "tissue_fraction", "CD133_label", "CD44_label"])
            for t in range(tiles):
                w.writerow([t * tile_px, 0, tile_px, tile_px, 1.0, t % 2, (t // 2) % 2])
    return root


def make_phantom(args: argparse.Namespace) -> Path:
    """Phantom slides -> tiles + truth labels (each step skipped when its output exists)."""
    from histocsc.synthetic.generate import make_cohort
    from histocsc.synthetic.truth_prep import prepare_from_truth
    from histocsc.wsi.grid import TilesConfig

    src, out = args.phantom / "phantom", args.phantom / "prepared"
    t0 = time.perf_counter()
    if not (src / "cohort.csv").is_file():
        make_cohort(src, args.phantom_cases, size_px=args.phantom_size, mpp=0.5, seed=0)
    t1 = time.perf_counter()
    if not (out / "cohort.csv").is_file():
        cfg = TilesConfig(tile_px=args.tile_px, mpp=args.mpp, stride_px=args.stride_px)
        prepare_from_truth(src, out, cfg, workers=max(1, os.cpu_count() or 1))
    print(f"phantom: slides {t1 - t0:.1f} s, tiles + labels {time.perf_counter() - t1:.1f} s")
    return out


class RepeatBatches(IterableDataset):
    """The same few in-memory batches, over and over (no decoding, no augmentation)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], total: int) -> None:
        self.batches, self.total = batches, total

    def __iter__(self):
        for i in range(self.total):
            yield self.batches[i % len(self.batches)]

    def __len__(self) -> int:
        return self.total


class StepClock(Callback):
    """Images/s over training batches after a warm-up."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.images += len(batch[0]) * trainer.world_size
        self.marks.append((time.perf_counter(), self.images))

    def rate(self) -> float:
        marks = self.marks[WARMUP:] if len(self.marks) > WARMUP + 2 else self.marks
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def pipeline_rate(loader: DataLoader, batches: int) -> float:
    """Tiles/s delivered by a DataLoader alone (after its first batch)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def train_rate(module: TileClassifier, loader: DataLoader, steps: int, args) -> float:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    return clock.rate()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared cohort (default: random tiles)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    p.add_argument("--pipeline-batches", type=int, default=30)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--phantom", type=Path, help="work folder for phantom slides and tiles")
    p.add_argument("--phantom-cases", type=int, default=4)
    p.add_argument("--phantom-size", type=int, default=4096, help="phantom slide side, px")
    p.add_argument("--tile-px", type=int, default=224, help="phantom / random cohort")
    p.add_argument("--mpp", type=float, default=0.5, help="phantom: tile resolution")
    p.add_argument("--stride-px", type=int, default=None, help="phantom: tile step (overlap)")
    p.add_argument("--tiles", type=int, default=1024, help="random cohort: tiles per case")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    tmp = None
    data_dir = args.data
    if data_dir is None and args.phantom is not None:
        data_dir = make_phantom(args)
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        data_dir = write_random_cohort(Path(tmp.name), 3, args.tiles, args.tile_px)
    cfg = TrainConfig.model_validate(
        {
            "data": {
                "root": str(data_dir),
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                # one epoch covers the whole measurement: no epoch-boundary stalls in it
                "samples_per_epoch": args.batch_size * (args.steps + WARMUP + 5),
                "augment": {"enabled": not args.no_augment},
            },
            "model": {"backbone": args.backbone},
            "trainer": {"accelerator": args.accelerator, "precision": args.precision},
        }
    )
    args.precision = resolve_precision(cfg.trainer)
    on_gpu = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    torch.backends.cudnn.benchmark = True
    dm = TileDataModule(cfg.data, seed=0)
    dm.setup("fit")
    print(f"data: {data_dir}  train tiles {len(dm.datasets['train'])}  tile {dm.tile_px} px")
    print(
        f"device: {torch.cuda.get_device_name(0) if on_gpu else 'cpu'}  precision "
        f"{args.precision}  backbone {args.backbone}  batch {args.batch_size}"
    )

    # 1. the data pipeline alone
    one = dm.cfg.model_copy(update={"num_workers": 0})
    dm_one = TileDataModule(one, seed=0)
    dm_one.setup("fit")
    per_worker = pipeline_rate(dm_one.train_dataloader(), max(3, args.pipeline_batches // 3))
    total = pipeline_rate(dm.train_dataloader(), args.pipeline_batches) if args.workers else 0.0
    print(
        f"pipeline: {per_worker:,.0f} tiles/s in one process; {total:,.0f} tiles/s with "
        f"{args.workers} workers ({total / max(1, args.workers):,.0f} per worker)"
    )

    def module() -> TileClassifier:
        torch.manual_seed(0)
        return TileClassifier(
            markers=dm.markers,
            model=ModelConfig(backbone=args.backbone),
            tile_px=dm.tile_px,
            mpp=dm.mpp,
            channels_last=on_gpu,
            pos_weight=dm.pos_weight.tolist(),
        )

    # 2. training on real tiles
    real = train_rate(module(), dm.train_dataloader(), args.steps, args)
    print(f"train, real tiles: {real:,.1f} images/s")

    # 3. training on synthetic in-memory tensors
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, dm.tile_px, dm.tile_px, 3)
    batches = [
        (
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen),
            torch.randint(0, 2, (args.batch_size, len(dm.markers)), generator=gen).float(),
        )
        for _ in range(4)
    ]
    synth_loader = DataLoader(
        RepeatBatches(batches, args.steps + 1), batch_size=None, pin_memory=on_gpu
    )
    synth = train_rate(module(), synth_loader, args.steps, args)
    ratio = real / synth if synth else 0.0
    print(f"train, synthetic tensors: {synth:,.1f} images/s")
    verdict = "" if not on_gpu else (" (ok, >= 0.85)" if ratio >= 0.85 else " (BELOW 0.85)")
    print(f"ratio real / synthetic: {ratio:.2f}{verdict}")
    figures = {
        "backbone": args.backbone,
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "tile_px": dm.tile_px,
        "workers": args.workers,
        "pipeline_tiles_per_s_one_process": per_worker,
        "pipeline_tiles_per_s_all_workers": total,
        "pipeline_tiles_per_s_per_worker": total / max(1, args.workers),
        "train_images_per_s_real": real,
        "train_images_per_s_synthetic": synth,
        "ratio_real_to_synthetic": ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
