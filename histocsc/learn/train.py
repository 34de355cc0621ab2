"""`histocsc train`: the training configuration, the run folder, and the Lightning Trainer.

Run folder layout: config.yaml (resolved), checkpoints/best.ckpt + last.ckpt,
logs/metrics.csv (+ tb/ when TensorBoard is installed), run.json (versions, data summary,
timings, best and test metrics), test_metrics.json.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from pydantic import Field, field_validator

from histocsc import __version__
from histocsc.config import StrictModel, load_config
from histocsc.errors import ConfigError, ModelError, ModelNotFoundError
from histocsc.io import atomic_path, write_json
from histocsc.learn import metrics_csv
from histocsc.learn.calibration import calibrate_run, to_meta
from histocsc.learn.data import DataConfig, TileDataModule
from histocsc.learn.model import IMAGENET_MEAN, IMAGENET_STD, META_KEY, check_backbone
from histocsc.learn.module import TileClassifier
from histocsc.progress import warn

MONITOR = "val/auroc_mean"
log = logging.getLogger(__name__)


class ModelConfig(StrictModel):
    """Which network, and from which local weights file (never downloaded)."""

    backbone: str = "resnet18"
    weights_path: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on the 0-1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = True  # used on GPU only

    @field_validator("backbone")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            check_backbone(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        return value


class OptimConfig(StrictModel):
    """AdamW and its learning-rate schedule (stepped every batch)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "onecycle", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)


class TrainerConfig(StrictModel):
    """Lightning Trainer settings. precision 'auto': bf16-mixed on a GPU, else 32-true."""

    max_epochs: int = Field(20, ge=1)
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"  # 'auto' picks DDP when there are several devices
    num_nodes: int = Field(1, ge=1)
    precision: str = "auto"
    patience: int = Field(5, ge=1)  # early stopping, in validation epochs
    log_every_n_steps: int = Field(20, ge=1)
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = None
    deterministic: bool = False
    benchmark: bool = True  # cuDNN autotuning (tiles have one size)
    progress_bar: bool = True


class TrainConfig(StrictModel):
    """Everything `histocsc train` needs (configs/train.yaml)."""

    seed: int = 0
    out: str = "runs/train"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    best_checkpoint: Path
    best_score: float
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    thresholds: dict[str, float]
    epochs: int
    global_rank: int = 0


class ImagesPerSecond(Callback):
    """Shows training images/s (all devices) in the progress bar and keeps per-epoch figures."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.epochs: list[dict[str, float]] = []
        self._times: list[tuple[float, int]] = []
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0
        self._times = [(self._start, 0)]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._images += len(batch[0]) * trainer.world_size
        self._times.append((time.perf_counter(), self._images))
        self._times = self._times[-self.window :]
        (t0, n0), (t1, n1) = self._times[0], self._times[-1]
        if t1 > t0:
            pl_module.log("train/img_per_s", (n1 - n0) / (t1 - t0), prog_bar=True, on_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "images": self._images,
                "seconds": round(seconds, 3),
                "images_per_s": round(self._images / seconds, 1) if seconds > 0 else 0.0,
            }
        )


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """configs/train.yaml plus dotted overrides, validated."""
    return load_config(TrainConfig, path, overrides)


def resolve_precision(cfg: TrainerConfig) -> str:
    """'auto' -> bf16-mixed on a CUDA GPU that supports it, else 32-true."""
    if cfg.precision != "auto":
        return cfg.precision
    on_gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def versions() -> dict[str, Any]:
    """Library versions and devices, for the run metadata."""
    import albumentations
    import numpy
    import torchmetrics
    import torchvision

    out: dict[str, Any] = {
        "histocsc": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "torchmetrics": torchmetrics.__version__,
        "albumentations": albumentations.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return out


def _csv_logger(run_dir: Path) -> CSVLogger:
    """CSVLogger in RUN/logs; the rows of an earlier run there are set aside (see metrics_csv)."""
    if rank_zero_only.rank == 0:
        metrics_csv.set_aside(run_dir / "logs")
    return CSVLogger(run_dir, name="logs", version="")


def _loggers(run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [_csv_logger(run_dir)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir, name="tb", version="", default_hp_metric=False))
    return loggers


def default_run_dir(cfg: TrainConfig, resume: str | Path | None) -> Path:
    """The run folder: cfg.out, or the folder of the checkpoint being resumed when out is unset."""
    if resume is not None:
        ckpt = Path(resume)
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent
    return Path(cfg.out)


def _update_checkpoint(path: Path, update: dict[str, Any]) -> None:
    """Merge `update` into a checkpoint's histocsc metadata (atomically)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    meta = data.setdefault(META_KEY, {})
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def train(
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train on the prepared cohort in cfg.data.root; write the run folder; return the result.
    `callbacks` join the Trainer's own (the command's signal handling and batch-log lines)."""
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, resume)
    if cfg.model.weights_path and not Path(cfg.model.weights_path).is_file():
        raise ModelNotFoundError(
            f"{cfg.model.weights_path}: weights file not found (model.weights_path; "
            "weights are never downloaded)"
        )
    if resume is not None and not Path(resume).is_file():
        raise ModelNotFoundError(f"{resume}: checkpoint to resume from not found")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data = TileDataModule(cfg.data, seed=cfg.seed)
    data.setup("fit")
    if not data.cases["val"]:
        raise ConfigError(
            f"{data.root}: no validation case (set split=val in cohort.csv or data.val_fraction)"
        )
    summary = data.summary()
    if rank_zero_only.rank == 0:
        for message in data.warnings:
            warn(message)
    setup_s = time.perf_counter() - started

    precision = resolve_precision(cfg.trainer)
    on_gpu = precision != "32-true" or (
        cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    )
    module = TileClassifier(
        markers=data.markers,
        backbone=cfg.model.backbone,
        weights_path=cfg.model.weights_path,
        tile_px=data.tile_px,
        mpp=data.mpp,
        mean=cfg.model.mean,
        std=cfg.model.std,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        schedule=cfg.optim.schedule,
        warmup_epochs=cfg.optim.warmup_epochs,
        pos_weight=data.pos_weight.tolist() if data.pos_weight is not None else None,
        channels_last=cfg.model.channels_last and on_gpu,
        data_summary=summary,
    )

    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "config.yaml") as tmp:
            resolved = cfg.model_dump(mode="json")
            resolved["out"] = str(run_dir)
            tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))

    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    speed = ImagesPerSecond()
    t = cfg.trainer
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=precision,
        logger=_loggers(run_dir),
        callbacks=[
            checkpoint,
            EarlyStopping(monitor=MONITOR, mode="max", patience=t.patience),
            speed,
            *(callbacks or []),
        ],
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        benchmark=t.benchmark and not t.deterministic,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )
    fit_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        # per-marker metrics are computed from all ranks' predictions already
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
        except RuntimeError as exc:
            if resume is not None and "state_dict" in str(exc):
                raise ModelError(f"{resume}: checkpoint does not fit this model ({exc})") from exc
            raise
        fit_s = time.perf_counter() - fit_start

        best = Path(checkpoint.best_model_path or run_dir / "checkpoints" / "last.ckpt")
        best_score = float(checkpoint.best_model_score or 0.0)
        test_results: dict[str, dict[str, float]] = {}
        test_start = time.perf_counter()
        if data.cases["test"]:
            trainer.test(module, datamodule=data, ckpt_path=str(best), verbose=False)
            test_results = module.test_results
        test_s = time.perf_counter() - test_start

    best_meta = torch.load(best, map_location="cpu", weights_only=True).get(META_KEY, {})
    result = TrainResult(
        run_dir=run_dir,
        best_checkpoint=best,
        best_score=best_score,
        val=best_meta.get("summary", {}).get("val", {}),
        test=test_results,
        thresholds=best_meta.get("thresholds", {}),
        epochs=int(trainer.current_epoch),
        global_rank=int(trainer.global_rank),
    )
    if trainer.is_global_zero:
        calibration, ece = calibrate_run(module, data, best)
        for marker, row in ece.items():
            test_results.setdefault(marker, {}).update(row)
        result.thresholds = {m: c.threshold for m, c in calibration.items()}
        extra = {"summary": {"test": test_results, "run_dir": str(run_dir)},
                 "thresholds": result.thresholds, "calibration": to_meta(calibration)}
        for path in {best, run_dir / "checkpoints" / "last.ckpt"}:
            if path.is_file():
                _update_checkpoint(path, extra)
        run_meta = {
            "histocsc_version": __version__,
            "versions": versions(),
            "config": cfg.model_dump(mode="json"),
            "resumed_from": str(resume) if resume else None,
            "precision": precision,
            "world_size": trainer.world_size,
            "data": summary,
            "best_checkpoint": str(best),
            "best_val_auroc_mean": best_score,
            "val": result.val,
            "test": test_results,
            "thresholds": result.thresholds,
            "epochs_run": result.epochs,
            "timings": {
                "setup_s": round(setup_s, 3),
                "fit_s": round(fit_s, 3),
                "test_s": round(test_s, 3),
                "total_s": round(time.perf_counter() - started, 3),
                "train_epochs": speed.epochs,
            },
        }
        write_json(run_dir / "run.json", run_meta)
        write_json(run_dir / "test_metrics.json", test_results)
        metrics_csv.put_back(run_dir / "logs")
    return result
