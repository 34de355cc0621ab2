"""Encoder features for a prepared cohort: the embedder (uint8 tiles -> embeddings, with the
preprocessing of the exported graph) and the per-case cache (histocsc.learn.feature_cache)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histocsc.errors import ConfigError, DataError, DataNotFoundError
from histocsc.learn.config import ModelConfig, normalisation
from histocsc.learn.encoders import encoder_spec, is_encoder
from histocsc.learn.feature_cache import CacheKey, CaseResult, cache_case, encoder_signature
from histocsc.learn.tilenet import Encoder, build_encoder, check_mpp
from histocsc.learn.weights import check_weights_path, weights_checksum

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


class Preprocess(torch.nn.Module):
    """uint8 NHWC -> float NCHW, /255, (x - mean) / std: the exported graph's first step."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available to PyTorch here")
    if device not in ("cpu", "cuda", "gpu"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cuda" if device in ("cuda", "gpu") else "cpu")


def cache_key(cfg: ModelConfig, tile_px: int, mpp: float, checksum: str) -> CacheKey:
    spec = encoder_spec(cfg.backbone)
    mean, std = normalisation(cfg)
    sig = encoder_signature(cfg.backbone, cfg.backbone_kwargs, mean, std, spec.embedding)
    return CacheKey(cfg.backbone, sig, checksum, int(tile_px), float(mpp))


def embedder(encoder: Encoder, cfg: ModelConfig, device: torch.device
             ) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 tiles (N, H, W, 3) -> float32 embeddings (N, D), in eval mode."""
    pre = Preprocess(*normalisation(cfg)).to(device)
    encoder = encoder.to(device).eval()

    def run(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = pre(torch.from_numpy(tiles).to(device))
            return encoder(x).float().cpu().numpy()

    return run


def default_features_dir(root: Path, backbone: str) -> Path:
    """<prepared>/features/<encoder name as a folder name>."""
    return root / "features" / re.sub(r"[^A-Za-z0-9._-]+", "_", backbone)


def _grid(folder: Path) -> tuple[int, float]:
    try:
        grid = json.loads((folder / "grid.json").read_text())
        return int(grid["tile_px"]), float(grid["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder / 'grid.json'}: unreadable grid metadata ({exc})") from exc


def cache_cohort(cfg: ModelConfig, root: Path, out_dir: Path, cases: list[str],
                 device: str = "auto", batch: int = 32,
                 progress: ProgressFactory | None = None) -> list[CaseResult]:
    """Features of every case in `cases` (folders of `root`), resumable case by case: a valid
    file is kept, a missing or stale one (encoder, weights or tile store changed) recomputed,
    and the reason logged."""
    if not is_encoder(cfg.backbone):
        raise ConfigError(f"model.backbone {cfg.backbone!r}: features need an encoder preset or "
                          "timm:<architecture>")
    checksum = ""
    if cfg.weights_path:
        checksum = weights_checksum(check_weights_path(cfg.weights_path))
    else:
        log.warning("no model.weights_path: the encoder has random weights")
    folders = [root / c for c in cases]
    for folder in folders:
        if not folder.is_dir():
            raise DataNotFoundError(f"{folder}: case folder of the prepared cohort not found")
    sizes = {_grid(f) for f in folders}
    if len(sizes) > 1:
        raise DataError(f"{root}: cases differ in tile size / mpp: {sorted(sizes)}")
    tile_px, mpp = sizes.pop() if sizes else (0, 0.0)
    key = cache_key(cfg, tile_px, mpp, checksum)
    spec = encoder_spec(cfg.backbone)
    check_mpp(spec, mpp)
    total = sum(int(np.load(f / "tiles.npy", mmap_mode="r").shape[0])
                for f in folders if (f / "tiles.npy").is_file())
    embed: Callable[[np.ndarray], np.ndarray] | None = None

    def lazy(tiles: np.ndarray) -> np.ndarray:  # build the encoder only if something is stale
        nonlocal embed
        if embed is None:
            encoder = build_encoder(cfg.backbone, cfg.backbone_kwargs, cfg.weights_path)
            embed = embedder(encoder, cfg, pick_device(device))
        return embed(tiles)

    results = []
    with (progress or _no_progress)(f"features {cfg.backbone}", total) as advance:
        for folder in folders:
            result = cache_case(folder, out_dir, key, lazy, batch, advance)
            if result.computed:
                log.info("%s: features computed (%s)", result.case, result.reason)
            results.append(result)
    return results


class _NoProgress:
    def __enter__(self) -> Callable[[int], None]:
        return lambda n=1: None

    def __exit__(self, *exc: object) -> None:
        return None


def _no_progress(description: str, total: int) -> _NoProgress:
    return _NoProgress()


def uses_feature_cache(cfg: Any) -> bool:
    """A frozen encoder on a tile store trains its head on cached features (cfg: a
    TrainConfig)."""
    return (is_encoder(cfg.model.backbone) and cfg.model.freeze == "all"
            and cfg.data.source == "store")


def prepare_features(cfg: Any, data: Any) -> int:
    """Fill the feature cache for every case of the split, switch `data` to it, record it in
    the data summary; returns the embedding size."""
    from histocsc.learn.feature_cache import read_features
    from histocsc.progress import progress_bar

    folder = Path(cfg.data.features or default_features_dir(data.root, cfg.model.backbone))
    cases = [c.case for s in ("train", "val", "test") for c in data.cases[s]]
    device = "cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else (
        "cpu" if cfg.trainer.accelerator == "cpu" else "auto")
    results = cache_cohort(cfg.model, data.root, folder, cases, device,
                           cfg.data.eval_batch_size or cfg.data.batch_size,
                           progress_bar if cfg.trainer.progress_bar else None)
    features = {r.case: read_features(r.path)[0] for r in results}
    data.use_features(features)
    data.feature_cache = {
        "dir": str(folder),
        "computed": {r.case: r.reason for r in results if r.computed},
        "reused": [r.case for r in results if not r.computed],
        "augmentation": "none: a frozen encoder trains its head on cached features, so no "
                        "image augmentation applies (data.augment is ignored)",
    }
    return int(next(iter(features.values())).shape[1])
