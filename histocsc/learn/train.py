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
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from histocsc import __version__
from histocsc.errors import ConfigError, ModelError, ModelNotFoundError
from histocsc.io import atomic_path, write_json
from histocsc.learn import metrics_csv
from histocsc.learn.calibration import calibrate_run, to_meta
from histocsc.learn.config import (  # noqa: F401 (re-exported: the configs lived here)
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
    load_train_config,
)
from histocsc.learn.data import TileDataModule
from histocsc.learn.encoders import encoder_spec, is_encoder
from histocsc.learn.features import prepare_features, uses_feature_cache
from histocsc.learn.model import META_KEY
from histocsc.learn.module import TileClassifier
from histocsc.learn.tilenet import check_mpp
from histocsc.learn.weights import check_weights_path, weights_checksum
from histocsc.progress import warn

MONITOR = "val/auroc_mean"
log = logging.getLogger(__name__)


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


@dataclass
class RunState:
    """What `finish_run` needs from the fit: the run, its data and module, trainer and timings."""

    cfg: TrainConfig
    run_dir: Path
    resume: str | Path | None
    data: TileDataModule
    module: TileClassifier
    trainer: L.Trainer
    checkpoint: ModelCheckpoint
    speed: ImagesPerSecond
    precision: str
    summary: dict[str, Any]
    started: float
    timings: dict[str, float]


def build_module(cfg: TrainConfig, data: TileDataModule, on_gpu: bool,
                 features_dim: int | None = None, weights_checksum: str = "") -> TileClassifier:
    """The LightningModule for this run's data and model configuration."""
    return TileClassifier(
        markers=data.markers,
        model=cfg.model,
        optim=cfg.optim,
        tile_px=data.tile_px,
        mpp=data.mpp,
        pos_weight=data.pos_weight.tolist() if data.pos_weight is not None else None,
        channels_last=cfg.model.channels_last and on_gpu,
        data_summary=data.summary(),
        features_dim=features_dim,
        weights_checksum=weights_checksum,
    )


def build_trainer(cfg: TrainConfig, run_dir: Path, precision: str,
                  callbacks: list[Callback] | None = None,
                  ) -> tuple[L.Trainer, ModelCheckpoint, ImagesPerSecond]:
    """The Lightning Trainer with its best/last checkpoint, early stopping and speed meter
    (and the caller's `callbacks`)."""
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
    return trainer, checkpoint, speed


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "config.yaml") as tmp:
            resolved = cfg.model_dump(mode="json")
            resolved["out"] = str(run_dir)
            tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))


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
    checksum = ""
    if is_encoder(cfg.model.backbone) and cfg.model.weights_path:
        checksum = weights_checksum(check_weights_path(cfg.model.weights_path))
    features_dim = prepare_features(cfg, data) if uses_feature_cache(cfg) else None
    summary = data.summary()
    timings = {"setup_s": time.perf_counter() - started}
    if rank_zero_only.rank == 0:
        for message in data.warnings:
            warn(message)

    precision = resolve_precision(cfg.trainer)
    on_gpu = precision != "32-true" or (
        cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    )
    module = build_module(cfg, data, on_gpu, features_dim, checksum)
    if is_encoder(cfg.model.backbone):
        note = check_mpp(encoder_spec(cfg.model.backbone), data.mpp)
        if note:
            summary.setdefault("warnings", []).append(note)
    _write_config(cfg, run_dir)
    trainer, checkpoint, speed = build_trainer(cfg, run_dir, precision, callbacks)
    state = RunState(cfg, run_dir, resume, data, module, trainer, checkpoint, speed, precision,
                     summary, started, timings)
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
        timings["fit_s"] = time.perf_counter() - fit_start
        return finish_run(state)


def finish_run(state: RunState) -> TrainResult:
    """Test the best checkpoint, calibrate, write thresholds and calibration into the
    checkpoints, and write run.json and test_metrics.json."""
    run_dir, trainer, data, module = state.run_dir, state.trainer, state.data, state.module
    checkpoint = state.checkpoint
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
        cfg, timings = state.cfg, state.timings
        run_meta = {
            "histocsc_version": __version__,
            "versions": versions(),
            "config": cfg.model_dump(mode="json"),
            "resumed_from": str(state.resume) if state.resume else None,
            "precision": state.precision,
            "world_size": trainer.world_size,
            "data": state.summary,
            "weights_checksum": state.module.weights_checksum,
            "best_checkpoint": str(best),
            "best_val_auroc_mean": best_score,
            "val": result.val,
            "test": test_results,
            "thresholds": result.thresholds,
            "epochs_run": result.epochs,
            "timings": {
                "setup_s": round(timings["setup_s"], 3),
                "fit_s": round(timings["fit_s"], 3),
                "test_s": round(test_s, 3),
                "total_s": round(time.perf_counter() - state.started, 3),
                "train_epochs": state.speed.epochs,
            },
        }
        write_json(run_dir / "run.json", run_meta)
        write_json(run_dir / "test_metrics.json", test_results)
        metrics_csv.put_back(run_dir / "logs")
    return result
