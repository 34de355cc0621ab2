"""Training data: a LightningDataModule over a prepared cohort (tile store + labels per case).

Cases are split, never tiles. Tiles come from each case's `tiles.npy` (memory-mapped) or are
read from the H&E slide itself; every DataLoader worker opens its own handles. Batches are
uint8 (N, H, W, 3) tensors; normalisation happens on the device (see module.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from histocsc.cohort import read_cohort
from histocsc.config import StrictModel
from histocsc.errors import ConfigError, DataError, DataNotFoundError
from histocsc.learn.augment import AugmentConfig, build_augment
from histocsc.learn.cases import CaseTiles, load_case
from histocsc.learn.cohort_checks import check_labels
from histocsc.learn.splits import assign_splits
from histocsc.learn.stopping import worker_init

SPLITS = ("train", "val", "test")


class DataConfig(StrictModel):
    """Where the prepared cohort is and how tiles reach the model."""

    root: str | None = None  # the prepared cohort folder (`histocsc train --data` overrides)
    markers: list[str] | None = None  # default: every marker column of the cohort
    source: Literal["store", "slide"] = "store"  # tiles.npy, or read from the H&E slides
    val_fraction: float = Field(0.2, ge=0, lt=1)  # for cases without a split in cohort.csv
    test_fraction: float = Field(0.2, ge=0, lt=1)
    min_tissue_fraction: float = Field(0.0, ge=0, le=1)
    skip_failed_qc: bool = True  # ignore markers (or cases) whose qc.json registration failed
    max_tiles_per_case: int | None = Field(None, ge=1)  # seeded subsample, for quick runs
    balance: Literal["pos_weight", "sampler", "none"] = "pos_weight"
    samples_per_epoch: int | None = Field(None, ge=1)  # default: every training tile once
    max_pos_weight: float = Field(100.0, gt=0)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(4, ge=0)
    pin_memory: bool = True
    prefetch_factor: int = Field(4, ge=1)
    augment: AugmentConfig = AugmentConfig()
    # encoder feature cache (frozen encoders); null: <root>/features/<backbone>
    features: str | None = None


class TileDataset(Dataset):
    """Tiles of several cases; items are (uint8 H x W x 3 tile, float labels with -1 ignored)."""

    def __init__(self, cases: list[CaseTiles], source: str = "store", augment: Any = None) -> None:
        self.cases = cases
        self.source = source
        self.augment = augment
        sizes = [len(c.rows) for c in cases]
        self.case_of = np.repeat(np.arange(len(cases)), sizes)
        self.index_in_case = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0)
        self.labels = (
            np.concatenate([c.labels for c in cases]).astype(np.float32)
            if cases
            else np.zeros((0, 0), np.float32)
        )
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.case_of)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, -1
        return state

    def _handle(self, ci: int) -> Any:
        if self._pid != os.getpid():  # a fresh worker: never share handles across processes
            self._handles, self._pid = {}, os.getpid()
        if ci not in self._handles:
            case = self.cases[ci]
            if self.source == "store":
                path = case.folder / "tiles.npy"
                if not path.is_file():
                    msg = f"{path}: tile store not found (set data.source=slide?)"
                    raise DataNotFoundError(msg)
                store = np.load(path, mmap_mode="r")
                if store.ndim != 4 or store.shape[1:] != (case.tile_px, case.tile_px, 3):
                    raise DataError(
                        f"{path}: shape {store.shape} is not (N, {case.tile_px}, "
                        f"{case.tile_px}, 3) as grid.json says"
                    )
                self._handles[ci] = store
            else:
                from histocsc.wsi.slide import open_slide

                if case.slide_path is None:
                    raise DataError(f"{case.folder / 'grid.json'}: no slide_path to read from")
                self._handles[ci] = open_slide(case.slide_path)
        return self._handles[ci]

    def read_tile(self, i: int) -> np.ndarray:
        """The raw uint8 tile for item `i` (no augmentation)."""
        ci, k = int(self.case_of[i]), int(self.index_in_case[i])
        case = self.cases[ci]
        handle = self._handle(ci)
        if self.source == "store":
            return np.array(handle[case.rows[k]])
        x, y, w, h = (int(v) for v in case.boxes[k])
        return handle.read(x, y, w, h, mpp=case.mpp, out_size=(case.tile_px, case.tile_px))

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tile = self.read_tile(i)
        if self.augment is not None:
            tile = self.augment(image=tile)["image"]
        return tile, self.labels[i]


class FeatureDataset(Dataset):
    """Cached encoder features of several cases; items are (float features, labels)."""

    def __init__(self, cases: list[CaseTiles], features: dict[str, np.ndarray]) -> None:
        self.cases = cases
        parts = [features[c.case][c.rows] for c in cases]
        dim = next((f.shape[1] for f in features.values()), 0)
        self.features = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dim))
        self.labels = (np.concatenate([c.labels for c in cases]).astype(np.float32)
                       if cases else np.zeros((0, 0), np.float32))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.features[i], self.labels[i]


def collate_tiles(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (tile, labels) pairs into uint8 (N, H, W, 3) and float (N, markers) tensors."""
    tiles = np.stack([t for t, _ in items])
    labels = np.stack([y for _, y in items])
    return torch.from_numpy(tiles), torch.from_numpy(labels)


def _loader_kwargs(cfg: DataConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "collate_fn": collate_tiles,
        "num_workers": cfg.num_workers,
        "pin_memory": cfg.pin_memory and torch.cuda.is_available(),
        "worker_init_fn": worker_init,  # stop signals are the trainer's (learn/stopping.py)
    }
    if cfg.num_workers > 0:
        kw["persistent_workers"] = True
        kw["prefetch_factor"] = cfg.prefetch_factor
    return kw


class TileDataModule(L.LightningDataModule):
    """Splits a prepared cohort by case and serves tiles for train / val / test."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        if not cfg.root:
            raise ConfigError("data.root: no prepared cohort folder given (use --data DIR)")
        self.cfg = cfg
        self.seed = seed
        self.root = Path(cfg.root)
        self.markers: list[str] = []
        self.cases: dict[str, list[CaseTiles]] = {s: [] for s in SPLITS}
        self.skipped: list[str] = []
        self.warnings: list[str] = []  # what the cohort cannot teach well (cohort_checks)
        self.datasets: dict[str, TileDataset] = {}
        self.pos_weight: torch.Tensor | None = None
        self.tile_px = 0
        self.mpp = 0.0
        self.feature_cache: dict[str, Any] | None = None  # set by train's prepare_features
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        cohort = read_cohort(self.root / "cohort.csv")
        self.markers = cohort.select_markers(self.cfg.markers)
        loaded: dict[str, CaseTiles] = {}
        for case in cohort.cases:
            folder = self.root / case.case
            if not folder.is_dir():
                raise DataNotFoundError(f"{folder}: case folder of the prepared cohort not found")
            tiles = load_case(folder, self.markers, self.cfg, self.seed)
            if tiles is None:
                self.skipped.append(f"{case.case}: registration QC failed")
            elif len(tiles.rows) == 0:
                self.skipped.append(f"{case.case}: no labelled tiles")
            else:
                loaded[case.case] = tiles
        if not loaded:
            raise DataError(f"{self.root}: no case with labelled tiles")
        sizes = {(c.tile_px, round(c.mpp, 6)) for c in loaded.values()}
        if len(sizes) > 1:
            raise DataError(f"{self.root}: cases differ in tile size / mpp: {sorted(sizes)}")
        first = next(iter(loaded.values()))
        self.tile_px, self.mpp = first.tile_px, first.mpp
        pos_rate = {
            c: float((t.labels == 1).sum() / max(1, (t.labels >= 0).sum()))
            for c, t in loaded.items()
        }
        given = {c.case: c.split for c in cohort.cases}
        patients = {c.case: c.patient for c in cohort.cases}
        split = assign_splits(list(loaded), given, pos_rate, self.cfg, self.seed, patients)
        for c, t in loaded.items():
            self.cases[split[c]].append(t)
        if not self.cases["train"]:
            raise DataError(f"{self.root}: no training case after the split")
        self._check_labels()
        train_aug = build_augment(self.cfg.augment, train=True)
        for s in SPLITS:
            aug = train_aug if s == "train" else None
            self.datasets[s] = TileDataset(self.cases[s], self.cfg.source, aug)
        self.pos_weight = self._pos_weight()
        self._ready = True

    def use_features(self, features: dict[str, np.ndarray]) -> None:
        """Serve cached features (case -> (N, D), rows as tiles.npy) instead of tiles: no
        image augmentation applies."""
        for s in SPLITS:
            for c in self.cases[s]:
                if len(features[c.case]) <= int(c.rows.max(initial=-1)):
                    raise DataError(f"{c.folder}: the feature cache holds "
                                    f"{len(features[c.case])} rows, fewer than the tiles")
            self.datasets[s] = FeatureDataset(self.cases[s], features)  # type: ignore[assignment]

    def _check_labels(self) -> None:
        self.warnings = check_labels(self.root, self.markers, self.cases)

    def _pos_weight(self) -> torch.Tensor:
        y = self.datasets["train"].labels
        if self.cfg.balance != "pos_weight":
            return torch.ones(len(self.markers))
        pos = (y == 1).sum(0)
        neg = (y == 0).sum(0)
        w = np.clip(neg / np.maximum(pos, 1), 1 / self.cfg.max_pos_weight, self.cfg.max_pos_weight)
        return torch.as_tensor(w, dtype=torch.float32)

    def _sampler(self) -> Sampler | None:
        """None (plain shuffling), a balanced sampler, or a fixed number of tiles per epoch."""
        ds = self.datasets["train"]
        n = self.cfg.samples_per_epoch or len(ds)
        generator = torch.Generator().manual_seed(self.seed)
        if self.cfg.balance == "sampler":
            y = ds.labels
            weight = np.zeros(len(y), np.float64)
            for j in range(y.shape[1]):
                for v in (0, 1):
                    hit = y[:, j] == v
                    if hit.any():
                        weight[hit] = np.maximum(weight[hit], 1.0 / hit.sum())
            return WeightedRandomSampler(weight.tolist(), n, replacement=True, generator=generator)
        if self.cfg.samples_per_epoch:
            return RandomSampler(ds, num_samples=n, generator=generator)
        return None

    def train_dataloader(self) -> DataLoader:
        sampler = self._sampler()
        return DataLoader(
            self.datasets["train"],
            batch_size=self.cfg.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=(self.cfg.samples_per_epoch or len(self.datasets["train"]))
            > self.cfg.batch_size,
            **_loader_kwargs(self.cfg),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
            shuffle=False,
            **_loader_kwargs(self.cfg),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def summary(self) -> dict[str, Any]:
        """Cases and tiles per split and per label, for the run metadata."""
        pw = self.pos_weight if self.pos_weight is not None else torch.ones(len(self.markers))
        out: dict[str, Any] = {
            "root": str(self.root),
            "markers": self.markers,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "source": self.cfg.source,
            "skipped_cases": self.skipped,
            "warnings": self.warnings,
            "pos_weight": {m: float(w) for m, w in zip(self.markers, pw.tolist(), strict=True)},
        }
        if self.feature_cache is not None:
            out["features"] = self.feature_cache
        for s in SPLITS:
            cases = self.cases[s]
            y = np.concatenate([c.labels for c in cases]) if cases else np.zeros((0, 0))
            out[s] = {
                "cases": [c.case for c in cases],
                "tiles": int(sum(len(c.rows) for c in cases)),
                "labels": {
                    m: {
                        "positive": int((y[:, j] == 1).sum()) if len(y) else 0,
                        "negative": int((y[:, j] == 0).sum()) if len(y) else 0,
                        "ignored": int((y[:, j] == -1).sum()) if len(y) else 0,
                    }
                    for j, m in enumerate(self.markers)
                },
                "notes": [f"{c.case}: {n}" for c in cases for n in c.notes],
            }
        return out
