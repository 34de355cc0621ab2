"""Local weights files for encoders: read (.safetensors, .bin, .pth), checksum, strict load.

A file is the state dict as the model's authors publish it. Loading is all or nothing: a missing
or unexpected key or a shape mismatch is one ModelError naming the file, the counts and the first
keys. A hub id or URL is refused: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from histocsc.errors import ModelError, ModelNotFoundError

SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_HUB = ("hf-hub:", "hf_hub:", "http://", "https://", "timm/", "s3://", "gs://")


def check_weights_path(path: str | Path) -> Path:
    """The path as a local file; ModelError for a hub id / URL, ModelNotFoundError if absent."""
    text = str(path)
    if text.startswith(_HUB) or (not Path(text).suffix and text.count("/") == 1
                                 and not Path(text).exists()):
        raise ModelError(f"model.weights_path {text!r} looks like a hub id or URL: histocsc never "
                         "downloads; download the file yourself and give its local path")
    p = Path(text).expanduser()
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix in SUFFIXES)
        if len(found) != 1:
            raise ModelError(f"{p}: a folder; name the weights file in it "
                             f"({', '.join(q.name for q in found) or 'none found'})")
        p = found[0]
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: weights file not found (weights are never downloaded)")
    if p.suffix not in SUFFIXES:
        raise ModelError(f"{p}: unknown weights format {p.suffix!r}; expected "
                         f"{', '.join(SUFFIXES)}")
    return p


def weights_checksum(path: str | Path) -> str:
    """sha256 of the whole file, as the Hugging Face file pages show it."""
    with Path(path).open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a `state_dict` / `model` wrapper and a uniform
    `module.` / `model.` prefix are taken off)."""
    p = check_weights_path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ModelError(f"{p}: not a readable weights file, truncated or corrupt ({exc})") from exc
    for key in ("state_dict", "model", "model_state_dict", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{p}: expected a state dict of tensors")
    state: dict[str, torch.Tensor] = dict(obj)
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                what: str) -> None:
    """Load `state` into `model` only if every key and shape fits; else one ModelError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("with another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:3])})")
        raise ModelError(f"{path}: does not fit {what} ({len(state)} tensors in the file, "
                         f"{len(own)} in the model): {'; '.join(parts)}. Nothing was loaded; "
                         "check model.backbone and model.backbone_kwargs")
    model.load_state_dict(state, strict=True)


def hf_dinov2_to_timm(state: dict[str, torch.Tensor], grid_tokens: int) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict (Phikon-v2's layout) in timm VisionTransformer
    names: q / k / v joined into qkv, LayerScale lambda1 -> gamma, position embeddings resampled
    to `grid_tokens` patch tokens (transformers interpolates them at run time; timm at load)."""
    from timm.layers import resample_abs_pos_embed

    if "embeddings.cls_token" not in state:
        return state  # not the transformers layout: strict_load names what does not fit
    out: dict[str, torch.Tensor] = {
        "cls_token": state["embeddings.cls_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"],
    }
    pos = state["embeddings.position_embeddings"]
    side = round(grid_tokens ** 0.5)
    out["pos_embed"] = resample_abs_pos_embed(pos, (side, side), num_prefix_tokens=1)
    n = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    rename = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
              "attention.output.dense": "attn.proj"}
    for i in range(n):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in rename.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat(
                [state[f"{src}attention.attention.{q}.{p}"] for q in ("query", "key", "value")])
        out[f"{dst}ls1.gamma"] = state[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = state[f"{src}layer_scale2.lambda1"]
    return out
