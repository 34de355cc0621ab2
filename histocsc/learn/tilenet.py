"""An encoder (a timm ViT or CNN) and a small head on its embedding: one logit per marker.

The input is the normalised float NCHW tile at any size: `Encoder` resizes it to the encoder's
input size first (bilinear, no antialiasing), the same operation in PyTorch and in the exported
ONNX graph. Bilinear resizing commutes with the per-channel normalisation, so resizing after it
equals resizing the raw tile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from histocsc.errors import ModelError
from histocsc.learn.encoders import EncoderSpec, encoder_spec
from histocsc.learn.weights import hf_dinov2_to_timm, read_weights, strict_load

MPP_TOLERANCE = 0.25
log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """A timm model giving one embedding per tile by its spec's rule."""

    def __init__(self, spec: EncoderSpec, backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        self.spec = spec
        kwargs = spec.build_kwargs(backbone_kwargs)
        try:
            self.body = timm.create_model(spec.architecture, pretrained=False, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"encoder {spec.name!r}: timm cannot build {spec.architecture} "
                             f"with {kwargs} ({exc})") from exc
        size = kwargs.get("img_size", spec.input_px)
        self.input_px = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.prefix = int(getattr(self.body, "num_prefix_tokens", 1))
        width = int(self.body.num_features)
        self.dim = 2 * width if spec.embedding == "cls+mean" else width
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear",
                              align_corners=False, antialias=False)
        if self.spec.embedding == "pool":
            return self.body(x)
        tokens = self.body.forward_features(x)
        if self.spec.embedding == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(1)], dim=-1)

    def train(self, mode: bool = True) -> Encoder:
        """A fully frozen encoder stays in eval mode (no dropout / drop-path)."""
        return super().train(mode and not self.frozen)


class Head(nn.Module):
    """Linear, or a one-hidden-layer MLP (LayerNorm, GELU, dropout), to one logit per marker."""

    def __init__(self, dim: int, outputs: int, kind: str = "linear", hidden: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, outputs))
        else:
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden, outputs))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class TileNet(nn.Module):
    """Encoder then head; `encoder` is None in a head trained on cached features."""

    def __init__(self, encoder: Encoder | None, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ModelError("this model holds only a head: it takes cached features")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_encoder(backbone: str, backbone_kwargs: dict[str, Any] | None = None,
                  weights_path: str | Path | None = None) -> Encoder:
    """The encoder of `backbone`, with the weights of `weights_path` loaded strictly."""
    encoder = Encoder(encoder_spec(backbone), backbone_kwargs)
    if weights_path is not None:
        load_encoder_weights(encoder, weights_path)
    return encoder


def load_encoder_weights(encoder: Encoder, path: str | Path) -> None:
    """All the encoder's tensors from `path` (in the authors' layout), or a ModelError."""
    state = read_weights(path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))
             or k in encoder.body.state_dict()}
    if encoder.spec.key_layout == "hf-dinov2":
        grid = encoder.body.patch_embed.num_patches
        try:
            state = hf_dinov2_to_timm(state, grid)
        except KeyError as exc:
            raise ModelError(f"{path}: not a complete Dinov2 state dict (no {exc})") from exc
    strict_load(encoder.body, state, path, f"encoder {encoder.spec.name!r} "
                f"({encoder.spec.architecture})")


def check_mpp(spec: EncoderSpec, tile_mpp: float) -> str | None:
    """A warning naming both figures when the tile mpp is >25 % away from the encoder's."""
    if spec.mpp is None or not tile_mpp:
        return None
    if abs(tile_mpp - spec.mpp) > MPP_TOLERANCE * spec.mpp:
        msg = (f"tiles at {tile_mpp:g} µm/px, but encoder {spec.name!r} was trained at "
               f"{spec.mpp:g} µm/px (more than {MPP_TOLERANCE:.0%} away): its features may be "
               "poorer; tile at the encoder's resolution for best results")
        log.warning(msg)
        return msg
    return None


def freeze(encoder: Encoder, mode: str | int) -> None:
    """`all`: nothing in the encoder trains; `none`: everything; N: only the last N blocks and
    the final norm."""
    if mode == "none":
        return
    for p in encoder.parameters():
        p.requires_grad_(False)
    if mode == "all" or mode == 0:
        encoder.frozen = mode == "all"
        return
    blocks = getattr(encoder.body, "blocks", None)
    if blocks is None:
        raise ModelError(f"model.freeze={mode}: encoder {encoder.spec.name!r} has no "
                         "transformer blocks; use all or none")
    n = int(mode)
    if n > len(blocks):
        raise ModelError(f"model.freeze={n}: encoder {encoder.spec.name!r} has only "
                         f"{len(blocks)} blocks")
    for block in list(blocks)[len(blocks) - n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for name in ("norm", "fc_norm"):
        module = getattr(encoder.body, name, None)
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(True)


def param_groups(model: TileNet, lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the head at `lr`; with `layer_decay` < 1, a ViT encoder of depth d by
    timm's param_groups_layer_decay: block i (0-based) at lr x layer_decay^(d - 1 - i), the
    patch / position embeddings at lr x layer_decay^d, the final norm at lr, no weight decay on
    norms and biases; else the whole encoder at `lr`."""
    from timm.optim import param_groups_layer_decay

    head = [p for p in model.head.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": head, "lr": lr, "weight_decay": weight_decay}]
    if model.encoder is None:
        return groups
    body = model.encoder.body
    if layer_decay < 1.0 and hasattr(body, "group_matcher"):
        for g in param_groups_layer_decay(body, weight_decay=weight_decay,
                                          layer_decay=layer_decay):
            params = [p for p in g["params"] if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr * g.get("lr_scale", 1.0),
                               "weight_decay": g["weight_decay"]})
        return groups
    params = [p for p in body.parameters() if p.requires_grad]
    if params:
        groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return groups
