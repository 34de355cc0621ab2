"""Pathology foundation-model tile encoders: the preset table, and `timm:<name>` for any timm
architecture. Each preset is the timm constructor and kwargs its authors publish, the input size,
normalisation, training resolution and embedding rule (docs/researcher.md lists the sources).

Nothing downloads: timm models are built with ``pretrained=False`` and the weights come only from
``model.weights_path`` (histocsc.learn.weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from histocsc.errors import ModelError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
TIMM_PREFIX = "timm:"
EmbeddingRule = Literal["cls", "cls+mean", "pool"]
# kwarg values that name timm / torch classes (YAML and the table hold their names)
_CLASSES = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU")}


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and what it expects and gives."""

    name: str  # the preset, or timm:<architecture>
    architecture: str  # timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    mpp: float | None = 0.5  # the resolution it was trained at (None: not a pathology model)
    embedding: EmbeddingRule = "cls"  # cls | cls+mean (patch tokens, registers skipped) | pool
    embedding_dim: int = 0  # as published (0: read from the built model)
    params: int = 0  # parameter count of the full-size model (0: not tabled)
    key_layout: Literal["timm", "hf-dinov2"] = "timm"  # the layout of the published state dict
    source: str = ""

    def build_kwargs(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Constructor kwargs with class names resolved, `extra` (backbone_kwargs) on top."""
        out = {**self.kwargs, **(extra or {}), "num_classes": 0}
        for key, value in list(out.items()):
            if isinstance(value, str) and value in _CLASSES:
                module, attr = _CLASSES[value]
                out[key] = getattr(__import__(module, fromlist=[attr]), attr)
        return out


_VIT = {"init_values": 1e-5, "dynamic_img_size": True}
PRESETS: dict[str, EncoderSpec] = {
    "uni": EncoderSpec(
        "uni", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, **_VIT}, embedding_dim=1024, params=303_350_784,
        source="huggingface.co/MahmoodLab/UNI model card; TRIDENT load.py UNIInferenceEncoder"),
    "uni2-h": EncoderSpec(
        "uni2-h", "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
         "act_layer": "SiLU", "reg_tokens": 8, **_VIT},
        embedding_dim=1536, params=681_394_176,
        source="huggingface.co/MahmoodLab/UNI2-h model card; TRIDENT UNIv2InferenceEncoder"),
    "virchow2": EncoderSpec(
        "virchow2", "vit_huge_patch14_224",
        {"img_size": 224, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
         "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", **_VIT},
        embedding="cls+mean", embedding_dim=2560, params=631_239_424,
        source="huggingface.co/paige-ai/Virchow2 model card; arXiv 2408.00738; TRIDENT "
               "Virchow2InferenceEncoder (class token + mean of tokens 5:)"),
    "h-optimus-0": EncoderSpec(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "global_pool": "token", **_VIT}, mean=HOPTIMUS[0], std=HOPTIMUS[1],
        embedding_dim=1536, params=1_134_774_272,
        source="huggingface.co/bioptimus/H-optimus-0 model card; "
               "TRIDENT HOptimus0InferenceEncoder"),
    "h-optimus-1": EncoderSpec(
        "h-optimus-1", "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "global_pool": "token", **_VIT}, mean=HOPTIMUS[0], std=HOPTIMUS[1],
        embedding_dim=1536, params=1_134_774_272,
        source="huggingface.co/bioptimus/H-optimus-1 model card; "
               "TRIDENT HOptimus1InferenceEncoder"),
    "phikon-v2": EncoderSpec(
        "phikon-v2", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, **_VIT}, embedding_dim=1024, params=303_350_784,
        key_layout="hf-dinov2",
        source="huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, ViT-L/16); TRIDENT "
               "Phikonv2InferenceEncoder (last_hidden_state[:, 0]); state dict mapped to timm"),
    "gigapath": EncoderSpec(
        "gigapath", "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
         "num_heads": 24, "mlp_ratio": 5.33334, **_VIT},
        embedding_dim=1536, params=1_134_953_984,
        source="huggingface.co/prov-gigapath/prov-gigapath model card; TRIDENT "
               "GigaPathInferenceEncoder"),
}


def is_encoder(backbone: str) -> bool:
    """True for a preset or a timm:<name> backbone."""
    return backbone in PRESETS or backbone.startswith(TIMM_PREFIX)


def encoder_spec(backbone: str) -> EncoderSpec:
    """The spec of a preset or of `timm:<name>` (ImageNet normalisation, timm's own pooling, no
    training resolution); ModelError for an unknown name or a hub id."""
    if backbone in PRESETS:
        return PRESETS[backbone]
    if not backbone.startswith(TIMM_PREFIX):
        raise ModelError(f"unknown encoder {backbone!r}; presets: {', '.join(PRESETS)}, or "
                         "timm:<architecture>")
    arch = backbone[len(TIMM_PREFIX):]
    if arch.startswith(("hf-hub:", "hf_hub:", "http:", "https:")) or "/" in arch:
        raise ModelError(f"{backbone!r}: a hub id would download; histocsc never downloads. "
                         "Name the architecture (timm:vit_small_patch16_224) and give the "
                         "weights file as model.weights_path")
    import timm

    if not timm.is_model(arch):
        raise ModelError(f"{backbone!r}: timm {timm.__version__} has no architecture {arch!r}")
    return EncoderSpec(backbone, arch, {}, mpp=None, embedding="pool",
                       source="timm architecture; weights from model.weights_path")
