"""Tile classifiers: torchvision backbones by name (or a tiny CNN) with one logit per marker.

Nothing is ever downloaded: backbones are built with ``weights=None`` and pretrained weights
come only from a local file the user names. ``load_trained`` reopens a training run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histocsc.errors import ModelError, ModelNotFoundError
from histocsc.learn.encoders import PRESETS, TIMM_PREFIX, encoder_spec, is_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_KEY = "histocsc"


class TinyCNN(nn.Module):
    """A small CNN for tests and CPU smoke runs: four conv blocks, global pooling, a linear head."""

    def __init__(self, num_outputs: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)

    return build


# name -> (constructor, dotted path of the final Linear layer to replace)
BACKBONES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet18": (_torchvision("resnet18"), "fc"),
    "resnet34": (_torchvision("resnet34"), "fc"),
    "resnet50": (_torchvision("resnet50"), "fc"),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), "classifier.1"),
    "mobilenet_v3_large": (_torchvision("mobilenet_v3_large"), "classifier.3"),
    "convnext_tiny": (_torchvision("convnext_tiny"), "classifier.2"),
}
TINY = "tiny"


def backbone_names() -> list[str]:
    """Every backbone name `build_model` accepts (and timm:<architecture>)."""
    return [TINY, *BACKBONES, *PRESETS]


def check_backbone(name: str) -> None:
    """Raise ModelError unless `name` is a known backbone."""
    if name.startswith(TIMM_PREFIX):
        encoder_spec(name)
    elif name != TINY and name not in BACKBONES and name not in PRESETS:
        raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}"
                         f" or {TIMM_PREFIX}<architecture>")


def build_model(
    backbone: str, num_outputs: int, weights_path: str | Path | None = None,
    encoder_options: dict[str, Any] | None = None,
) -> nn.Module:
    """A classifier with `num_outputs` logits (one per marker), optionally initialised from a
    local weights file (a torchvision/ImageNet state dict or a checkpoint holding one; for an
    encoder, its authors' state dict). `encoder_options`: backbone_kwargs, head, head_hidden,
    head_dropout, freeze (encoders only); with features_only, no encoder (a head on cached
    features of embedding size `dim`)."""
    check_backbone(backbone)
    if num_outputs < 1:
        raise ModelError(f"a model needs at least one output, got {num_outputs}")
    if is_encoder(backbone):
        return build_tilenet(backbone, num_outputs, weights_path, encoder_options or {})
    if backbone == TINY:
        model: nn.Module = TinyCNN(num_outputs)
        head = "fc"
    else:
        make, head = BACKBONES[backbone]
        model = make()
    if weights_path is not None:
        _load_backbone_weights(model, Path(weights_path), head, backbone)
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise ModelError(f"backbone {backbone!r}: {head} is not a Linear layer")
    if old.out_features != num_outputs:
        _set_submodule(model, head, nn.Linear(old.in_features, num_outputs))
    return model


def build_tilenet(backbone: str, num_outputs: int, weights_path: str | Path | None,
                  opts: dict[str, Any]) -> nn.Module:
    """Encoder + head (histocsc.learn.tilenet); no encoder with opts["features_only"]."""
    from histocsc.learn.tilenet import Head, TileNet, build_encoder, freeze

    encoder = None
    if opts.get("features_only"):
        dim = int(opts["dim"])
    else:
        encoder = build_encoder(backbone, opts.get("backbone_kwargs"), weights_path)
        freeze(encoder, opts.get("freeze", "none"))
        dim = encoder.dim
    head = Head(dim, num_outputs, opts.get("head", "linear"), int(opts.get("head_hidden", 256)),
                float(opts.get("head_dropout", 0.0)))
    return TileNet(encoder, head)


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: weights file not found (weights are never downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ModelError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: expected a state dict of tensors")
    for prefix in ("model.", "module."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _load_backbone_weights(model: nn.Module, path: Path, head: str, backbone: str) -> None:
    """Copy every non-head tensor from `path`; the head is always re-initialised."""
    state = _read_state_dict(path)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    missing = [k for k in own if not k.startswith(head + ".") and k not in body]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and body[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            detail.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        raise ModelError(
            f"{path}: weights do not fit backbone {backbone!r}: {', '.join(detail)} tensors"
        )
    model.load_state_dict(body, strict=False)


def find_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or a run folder's checkpoints/best.ckpt (else last.ckpt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            for candidate in (path / "checkpoints" / name, path / name):
                if candidate.is_file():
                    return candidate
        raise ModelError(f"{path}: no checkpoints/best.ckpt or last.ckpt in this run folder")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint not found")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint onto the CPU."""
    ckpt = find_checkpoint(path)
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{ckpt}: not a readable checkpoint ({exc})") from exc
    if not isinstance(data, dict) or "state_dict" not in data or META_KEY not in data:
        raise ModelError(f"{ckpt}: not a histocsc training checkpoint (no model metadata)")
    return data


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Reopen a trained model from a run folder or a .ckpt file.

    Returns the model in eval mode and its metadata. Input: float NCHW RGB scaled to 0-1, then
    per channel minus meta["mean"] and divided by meta["std"]. Output: one logit per marker
    (meta["markers"] order; a sigmoid gives probabilities, meta["thresholds"] the cut-offs
    chosen on validation). Meta keys: markers, tile_px, mpp, backbone, mean, std, thresholds,
    summary (epoch, val/test metrics, data summary), output ("logits"), checkpoint.
    """
    ckpt_path = find_checkpoint(path)
    data = read_checkpoint(ckpt_path)
    meta = dict(data[META_KEY])
    for key in ("markers", "tile_px", "mpp", "backbone", "mean", "std"):
        if key not in meta:
            raise ModelError(f"{ckpt_path}: checkpoint metadata lacks {key!r}")
    markers = list(meta["markers"])
    meta.setdefault("thresholds", {m: 0.5 for m in markers})
    meta.setdefault("summary", {})
    meta["output"] = "logits"
    meta["checkpoint"] = str(ckpt_path)
    state = {k[len("model.") :]: v for k, v in data["state_dict"].items() if k.startswith("model.")}
    in_ckpt = meta.get("encoder_in_checkpoint", True)
    weights = None if in_ckpt else _encoder_weights(meta, ckpt_path)
    opts = {k: v for k, v in (meta.get("encoder_options") or {}).items() if k != "freeze"}
    model = build_model(meta["backbone"], len(markers), weights, opts)
    if not in_ckpt:  # a head trained on cached features: the encoder came from its file
        state = {**{k: v for k, v in model.state_dict().items() if k.startswith("encoder.")},
                 **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{ckpt_path}: weights do not fit {meta['backbone']!r}: {exc}") from exc
    model.eval()
    return model, meta


def _encoder_weights(meta: dict[str, Any], ckpt: Path) -> Path:
    """The encoder weights file a head-only checkpoint names, checked against its checksum."""
    from histocsc.learn.weights import check_weights_path, weights_checksum

    if not meta.get("weights_path"):
        raise ModelError(f"{ckpt}: a head trained on cached features, but no encoder weights "
                         "file is recorded")
    path = check_weights_path(meta["weights_path"])
    want, got = meta.get("weights_checksum", ""), weights_checksum(path)
    if want and want != got:
        raise ModelError(f"{path}: checksum {got} is not the {want} this model was trained "
                         f"with ({ckpt}); the encoder weights file changed")
    return path
