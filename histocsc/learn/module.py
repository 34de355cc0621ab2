"""The LightningModule: masked multi-label BCE, AdamW, warm-up + cosine / one-cycle schedule
(torch's schedulers), and per-marker AUROC / average precision (torchmetrics) on validation and
test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)

from histocsc.learn.calibration import DEFAULT_THRESHOLD
from histocsc.learn.config import ModelConfig, OptimConfig, normalisation
from histocsc.learn.model import META_KEY, build_model
from histocsc.learn.tilenet import TileNet, param_groups


def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None):
    """Mean BCE per marker over labelled tiles only (target -1 is ignored), averaged over the
    markers that have at least one labelled tile in the batch."""
    mask = target >= 0
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), target.clamp(min=0).float(), pos_weight=pos_weight, reduction="none"
    )
    count = mask.sum(0)
    per_marker = (loss * mask).sum(0) / count.clamp(min=1)
    present = count > 0
    if not present.any():
        return (logits * 0).sum()
    return per_marker[present].mean()


class MarkerMetrics(Metric):
    """Per-marker AUROC and average precision over labelled tiles (no threshold: the one
    threshold rule is histocsc.learn.calibration's, applied when the run finishes)."""

    full_state_update = False

    def __init__(self, markers: list[str]) -> None:
        super().__init__()
        self.markers = list(markers)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.probs.append(torch.sigmoid(logits.detach().float()))
        self.target.append(target.detach().to(torch.int8))

    def compute(self) -> dict[str, dict[str, float]]:
        probs = _cat(self.probs, len(self.markers), torch.float32, self.device)
        target = _cat(self.target, len(self.markers), torch.int8, self.device)
        aurocs = masked_auroc(probs, target)
        out: dict[str, dict[str, float]] = {}
        for j, marker in enumerate(self.markers):
            keep = target[:, j] >= 0
            p, t = probs[keep, j], target[keep, j].long()
            pos, neg = int((t == 1).sum()), int((t == 0).sum())
            row = {"positive": float(pos), "negative": float(neg)}
            if pos and neg:
                row["auroc"] = float(aurocs[j])
                row["ap"] = float(binary_average_precision(p, t))
            else:
                row.update(auroc=math.nan, ap=math.nan)
            out[marker] = row
        return out


def masked_auroc(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AUROC per marker (column) over the tiles labelled for it (target -1 is ignored); 0 where
    a marker lacks a class among them (`compute` reports that as NaN). Column by column:
    torchmetrics' multilabel AUROC fails outright on a column whose every tile is ignored (a
    test case whose marker registration was flagged)."""
    out = torch.zeros(probs.shape[1], device=probs.device)
    for j in range(probs.shape[1]):
        keep = target[:, j] >= 0
        t = target[keep, j].long()
        if 0 < int(t.sum()) < len(t):
            out[j] = binary_auroc(probs[keep, j], t)
    return out


def _cat(items: Any, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(items, torch.Tensor):
        return items
    if not items:
        return torch.zeros((0, width), dtype=dtype, device=device)
    return torch.cat(items)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """Linear warm-up over `warmup` steps (from 1 / (warmup + 1) of the rate), then cosine
    annealing to 0 at step `total`."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup <= 0:
        return cosine
    linear = sched.LinearLR(optimizer, 1 / (warmup + 1), 1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class TileClassifier(L.LightningModule):
    """One logit per marker from a tile. Batches arrive as uint8 NHWC and are normalised here;
    with `features_dim`, batches are cached encoder features (N, D) and only the head trains."""

    def __init__(
        self,
        markers: list[str],
        model: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        tile_px: int = 224,
        mpp: float = 0.5,
        pos_weight: list[float] | None = None,
        channels_last: bool = False,
        data_summary: dict[str, Any] | None = None,
        features_dim: int | None = None,
        weights_checksum: str = "",
    ) -> None:
        super().__init__()
        self.model_cfg = model or ModelConfig()
        self.optim_cfg = optim or OptimConfig()
        mean, std = normalisation(self.model_cfg)
        self.save_hyperparameters({
            "markers": list(markers), "model": self.model_cfg.model_dump(mode="json"),
            "optim": self.optim_cfg.model_dump(mode="json"), "tile_px": int(tile_px),
            "mpp": float(mpp), "mean": list(mean), "std": list(std),
            "channels_last": bool(channels_last), "features_dim": features_dim,
        })
        self.weights_checksum = weights_checksum
        self.model = build_model(self.model_cfg.backbone, len(markers),
                                 None if features_dim else self.model_cfg.weights_path,
                                 {**self.encoder_options(), "features_only": bool(features_dim),
                                  "dim": features_dim, "freeze": self.model_cfg.freeze})
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        pw = torch.tensor(pos_weight if pos_weight is not None else [1.0] * len(markers))
        self.register_buffer("pos_weight", pw.float(), persistent=False)
        self.val_metrics = MarkerMetrics(markers)
        self.test_metrics = MarkerMetrics(markers)
        # the calibrated rule's cut; a checkpoint saved before calibration (an interrupted run)
        # holds 0.5 on the uncalibrated model, as the rule says for an uncalibrated model
        self.thresholds = {m: DEFAULT_THRESHOLD for m in markers}
        self.last_val: dict[str, dict[str, float]] = {}
        self.val_epoch = -1  # the epoch whose validation gave last_val
        self.test_results: dict[str, dict[str, float]] = {}
        self.data_summary = data_summary or {}

    def encoder_options(self) -> dict[str, Any]:
        """What rebuilds the encoder and head (load_trained)."""
        m = self.model_cfg
        return {"backbone_kwargs": dict(m.backbone_kwargs), "head": m.head,
                "head_hidden": m.head_hidden, "head_dropout": m.head_dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.features_dim:
            return self.model.head(x)
        return self.model(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        tiles, target = batch
        if tiles.dtype == torch.uint8:
            x = tiles.permute(0, 3, 1, 2).float()
            x = (x - self.mean * 255.0) / self.std
            if self.hparams.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            tiles = x
        return tiles, target

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = masked_bce(self(x), y, self.pos_weight)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def _eval_step(self, batch: Any, prefix: str, metrics: Any) -> None:
        x, y = batch
        logits = self(x)
        loss = masked_bce(logits, y, self.pos_weight)
        self.log(f"{prefix}/loss", loss, batch_size=len(x), sync_dist=True)
        metrics.update(logits, y)

    def _log_metrics(self, prefix: str, results: dict[str, dict[str, float]]) -> None:
        aurocs = [r["auroc"] for r in results.values() if not math.isnan(r["auroc"])]
        aps = [r["ap"] for r in results.values() if not math.isnan(r["ap"])]
        values = {
            f"{prefix}/auroc_mean": sum(aurocs) / len(aurocs) if aurocs else 0.0,
            f"{prefix}/ap_mean": sum(aps) / len(aps) if aps else 0.0,
        }
        for marker, r in results.items():
            if not math.isnan(r["auroc"]):
                values[f"{prefix}/auroc/{marker}"] = r["auroc"]
                values[f"{prefix}/ap/{marker}"] = r["ap"]
        mean = values.pop(f"{prefix}/auroc_mean")
        self.log(f"{prefix}/auroc_mean", mean, prog_bar=True)
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        self._log_metrics("val", results)
        if not self.trainer.sanity_checking:
            self.last_val = results
            self.val_epoch = int(self.current_epoch)

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        self.test_results = results
        self._log_metrics("test", results)

    def configure_optimizers(self) -> Any:
        hp = self.optim_cfg
        if isinstance(self.model, TileNet):
            groups: Any = param_groups(self.model, hp.lr, hp.weight_decay, hp.layer_decay)
        else:
            groups = self.parameters()
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                pct_start=0.3,
            )
        else:
            epochs = max(1, self.trainer.max_epochs or 1)
            warmup = min(total - 1, int(round(total * hp.warmup_epochs / epochs)))
            scheduler = warmup_cosine(optimizer, warmup, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def model_meta(self) -> dict[str, Any]:
        """What `load_trained` needs to rebuild and use the model."""
        hp = self.hparams
        meta = {
            "markers": list(hp.markers),
            "tile_px": int(hp.tile_px),
            "mpp": float(hp.mpp),
            "backbone": self.model_cfg.backbone,
            "mean": [float(v) for v in hp.mean],
            "std": [float(v) for v in hp.std],
            "thresholds": dict(self.thresholds),
            "summary": {
                "epoch": self.val_epoch,  # of the validation metrics and thresholds below
                "global_step": int(self.global_step),
                "val": self.last_val,
                "data": self.data_summary,
            },
        }
        if isinstance(self.model, TileNet):
            meta.update(self.encoder_meta())
        return meta

    def encoder_meta(self) -> dict[str, Any]:
        """The encoder keys of the metadata: how to rebuild it, where its weights are."""
        from histocsc.learn.encoders import encoder_spec

        spec = encoder_spec(self.model_cfg.backbone)
        enc = self.model.encoder
        weights = self.model_cfg.weights_path
        return {
            "encoder_options": self.encoder_options(),
            "encoder_in_checkpoint": enc is not None,
            "weights_path": str(Path(weights).resolve()) if weights else None,
            "weights_checksum": self.weights_checksum,
            "encoder": {"name": spec.name, "architecture": spec.architecture,
                        "input_px": enc.input_px if enc else None, "embedding": spec.embedding,
                        "embedding_dim": enc.dim if enc else self.hparams.features_dim,
                        "trained_mpp": spec.mpp, "freeze": self.model_cfg.freeze},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.model_meta()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY) or {}
        self.thresholds = dict(meta.get("thresholds") or self.thresholds)
        summary = meta.get("summary") or {}
        self.last_val = summary.get("val") or self.last_val
        self.val_epoch = int(summary.get("epoch", self.val_epoch))
