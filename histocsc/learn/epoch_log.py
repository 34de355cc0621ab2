"""Training progress for a batch log (no terminal): one line per epoch with its metrics, and
a line at least every HISTOCSC_PROGRESS_S seconds (30) inside an epoch (histocsc.progress)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from histocsc.progress import LogLines, duration, log_line


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, Any],
               markers: list[str], seconds: float, images_per_s: float | None) -> str:
    """'epoch 3/20: train loss 0.412, val loss 0.455, val AUROC 0.812 (CD133 0.80, CD44 n/a),
    130 img/s, 12 s'."""
    def fmt(key: str, digits: int = 3) -> str:
        v = _num(metrics.get(key))
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"

    per = ", ".join(f"{m} {fmt(f'val/auroc/{m}', 2)}" for m in markers)
    speed = f", {images_per_s:,.0f} img/s" if images_per_s else ""
    return (f"epoch {epoch}/{max_epochs or '?'}: train loss {fmt('train/loss_epoch')}, "
            f"val loss {fmt('val/loss')}, val AUROC {fmt('val/auroc_mean')} ({per})"
            f"{speed}, {duration(seconds)}")


class EpochLog(Callback):
    """The per-epoch line and the in-epoch heartbeat, on global rank 0 only."""

    def __init__(self) -> None:
        self._lines: LogLines | None = None
        self._start = 0.0
        self._images = 0

    def _close(self) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._start, self._images = time.monotonic(), 0
        total = trainer.num_training_batches
        if not isinstance(total, int) or total <= 0:
            total = None
        epoch = f"train epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self._lines = LogLines(epoch, total, "batches", final=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._lines is not None:
            self._lines.advance(1)
            self._images += len(batch[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._close()
        seconds = time.monotonic() - self._start
        markers = list(getattr(pl_module.hparams, "markers", []))
        log_line(epoch_line(trainer.current_epoch + 1, trainer.max_epochs,
                            dict(trainer.callback_metrics), markers, seconds,
                            self._images / seconds if seconds > 0 else None))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._close()
            log_line(f"training done: {trainer.current_epoch} epoch(s)"
                     + (" (early stopping)" if trainer.should_stop
                        and trainer.current_epoch < (trainer.max_epochs or 0) else ""))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._close()
