"""Training configuration (configs/train.yaml): the model, the optimiser, the Lightning Trainer,
and the whole `histocsc train` run. The data section lives with the data (learn/data.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from histocsc.config import StrictModel, load_config
from histocsc.errors import ModelError
from histocsc.learn.data import DataConfig
from histocsc.learn.model import check_backbone


class ModelConfig(StrictModel):
    """Which network, and from which local weights file (never downloaded).

    backbone: tiny, a torchvision name, an encoder preset (uni, uni2-h, virchow2, h-optimus-0,
    h-optimus-1, phikon-v2, gigapath) or timm:<architecture>. mean / std null: the backbone's own
    (ImageNet for torchvision, the preset's for an encoder)."""

    backbone: str = "resnet18"
    weights_path: str | None = None
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)  # timm constructor kwargs
    mean: tuple[float, float, float] | None = None  # on the 0-1 scale
    std: tuple[float, float, float] | None = None
    freeze: Literal["all", "none"] | int = "none"  # encoders: all, none or the last N blocks
    head: Literal["linear", "mlp"] = "linear"  # the head on an encoder's embedding
    head_hidden: int = Field(256, ge=1)
    head_dropout: float = Field(0.0, ge=0, lt=1)
    channels_last: bool = True  # used on GPU only

    @field_validator("backbone")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            check_backbone(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("freeze")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("freeze: all, none, or the number (>= 0) of last blocks to train")
        return value


class OptimConfig(StrictModel):
    """AdamW and its learning-rate schedule (stepped every batch)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "onecycle", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    layer_decay: float = Field(1.0, gt=0, le=1)  # ViT fine-tuning: lr x decay^(depth - layer)


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


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """configs/train.yaml plus dotted overrides, validated."""
    return load_config(TrainConfig, path, overrides)


def normalisation(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0-1 scale: the configured ones, else the backbone's own."""
    from histocsc.learn.encoders import IMAGENET, encoder_spec, is_encoder

    mean, std = IMAGENET
    if is_encoder(cfg.backbone):
        spec = encoder_spec(cfg.backbone)
        mean, std = spec.mean, spec.std
    return tuple(cfg.mean or mean), tuple(cfg.std or std)
