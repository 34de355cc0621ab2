"""Foundation-model encoders: presets in their authors' key layout, strict offline loading,
freeze modes, layer-wise learning-rate decay, resizing in the model and the mpp warning.

No real weights can be had here: each preset is tested with a small member of its family
(fewer blocks, narrower, via backbone_kwargs) whose random weights are saved in the layout the
authors publish, through the same loading code; the full-size architecture is built on the
meta device only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from histocsc.errors import ConfigError, ModelError
from histocsc.learn.config import ModelConfig, normalisation
from histocsc.learn.encoders import HOPTIMUS, PRESETS, encoder_spec
from histocsc.learn.model import build_model
from histocsc.learn.tilenet import (
    Encoder,
    build_encoder,
    check_mpp,
    param_groups,
)
from histocsc.learn.weights import read_weights, weights_checksum

SMALL = {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 112}


def timm_to_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of histocsc's mapping: a timm ViT state dict in transformers' Dinov2Model
    names (Phikon-v2's published layout), with a mask token as transformers has."""
    out = {"embeddings.cls_token": state["cls_token"],
           "embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1]),
           "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for a, c in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2"), ("attn.proj", "attention.output.dense")):
                out[f"{h}{c}.{p}"] = state[f"{b}{a}.{p}"]
            q, k, v = state[f"{b}attn.qkv.{p}"].chunk(3)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"{h}attention.attention.{name}.{p}"] = t
        out[f"{h}layer_scale1.lambda1"] = state[f"{b}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = state[f"{b}ls2.gamma"]
    return out


def reference(preset: str, kwargs: dict) -> torch.nn.Module:
    """The small family member built straight with timm, as the authors' loader does."""
    spec = PRESETS[preset]
    torch.manual_seed(1)
    return timm.create_model(spec.architecture, pretrained=False,
                             **spec.build_kwargs(kwargs)).eval()


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("preset,suffix", [
    ("uni", ".bin"), ("uni2-h", ".safetensors"), ("virchow2", ".pth"),
    ("h-optimus-0", ".safetensors"), ("h-optimus-1", ".bin"), ("phikon-v2", ".safetensors"),
    ("gigapath", ".bin")])
def test_small_preset_loads_its_authors_layout_and_equals_timm(preset: str, suffix: str,
                                                               tmp_path: Path) -> None:
    ref = reference(preset, SMALL)
    state = ref.state_dict()
    if PRESETS[preset].key_layout == "hf-dinov2":
        state = timm_to_hf_dinov2(state)
    weights = save(state, tmp_path / f"w{suffix}")
    enc = build_encoder(preset, SMALL, weights).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        want = tokens[:, 0]
        if preset == "virchow2":  # class token + mean of the patch tokens (registers skipped)
            want = torch.cat([tokens[:, 0], tokens[:, 1 + 4:].mean(1)], dim=-1)
        else:
            assert torch.allclose(ref(x), want, atol=1e-6)  # timm's own pooling: the CLS
        got = enc(x)
    assert got.shape == (2, enc.dim) and enc.dim == want.shape[1]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_full_size_preset_matches_the_table(preset: str) -> None:
    spec = PRESETS[preset]
    with torch.device("meta"):
        enc = Encoder(spec)
        out = enc(torch.zeros(1, 3, spec.input_px, spec.input_px))
    assert sum(p.numel() for p in enc.body.parameters()) == spec.params
    assert enc.dim == spec.embedding_dim == out.shape[1]
    assert enc.input_px == 224


def test_preset_normalisation_and_training_resolution() -> None:
    assert normalisation(ModelConfig(backbone="h-optimus-0")) == HOPTIMUS
    assert normalisation(ModelConfig(backbone="uni"))[0] == (0.485, 0.456, 0.406)
    assert normalisation(ModelConfig(backbone="uni", mean=(0.5, 0.5, 0.5)))[0] == (0.5, 0.5, 0.5)
    assert all(s.mpp == 0.5 for s in PRESETS.values())


def test_truncated_file_is_one_clear_error(tmp_path: Path) -> None:
    weights = save(reference("uni", SMALL).state_dict(), tmp_path / "w.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"w\.safetensors: not a readable weights file"):
        build_encoder("uni", SMALL, weights)


def test_wrong_architecture_names_counts_and_first_keys(tmp_path: Path) -> None:
    weights = save(reference("uni", SMALL).state_dict(), tmp_path / "uni.bin")
    with pytest.raises(ModelError) as err:
        build_encoder("virchow2", SMALL, weights)
    msg = str(err.value)
    assert "uni.bin: does not fit encoder 'virchow2'" in msg and "Nothing was loaded" in msg
    assert "missing (first: reg_token" in msg and "with another shape" in msg


def test_hub_ids_are_refused_with_the_reason(tmp_path: Path) -> None:
    for path in ("MahmoodLab/UNI", "hf-hub:MahmoodLab/uni", "https://x.org/w.bin"):
        with pytest.raises(ModelError, match="never downloads"):
            build_encoder("uni", SMALL, path)
    with pytest.raises(ModelError, match="a hub id would download"):
        encoder_spec("timm:hf-hub:MahmoodLab/uni")
    with pytest.raises(ConfigError, match="timm .* has no architecture 'vit_nonexistent'"):
        from histocsc.learn.config import load_train_config

        load_train_config(None, {"model.backbone": "timm:vit_nonexistent"})


def test_checksum_is_the_whole_file_sha256(tmp_path: Path) -> None:
    import hashlib

    weights = save(reference("uni", SMALL).state_dict(), tmp_path / "w.bin")
    assert weights_checksum(weights) == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(read_weights(weights)) == set(reference("uni", SMALL).state_dict())


def test_freeze_modes_and_layer_decay() -> None:
    kwargs = {**SMALL, "depth": 3}
    net = build_model("uni", 2, encoder_options={"backbone_kwargs": kwargs, "freeze": 2})
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.body.blocks.0.") for n in trainable)
    assert any(n.startswith("encoder.body.blocks.1.") for n in trainable)
    assert {"encoder.body.norm.weight", "head.net.1.weight"} <= trainable
    assert "encoder.body.patch_embed.proj.weight" not in trainable

    frozen = build_model("uni", 2, encoder_options={"backbone_kwargs": kwargs, "freeze": "all"})
    assert all(not p.requires_grad for p in frozen.encoder.parameters())
    frozen.train()
    assert not frozen.encoder.training and frozen.head.training

    full = build_model("uni", 2, encoder_options={"backbone_kwargs": kwargs})
    groups = param_groups(full, lr=1e-3, weight_decay=0.01, layer_decay=0.5)
    names = {id(p): n for n, p in full.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert lr_of["head.net.1.weight"] == pytest.approx(1e-3)
    assert lr_of["encoder.body.blocks.2.attn.qkv.weight"] == pytest.approx(1e-3)
    assert lr_of["encoder.body.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lr_of["encoder.body.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert sum(len(g["params"]) for g in groups) == len(list(full.parameters()))
    with pytest.raises(ModelError, match="has only 3 blocks"):
        build_model("uni", 2, encoder_options={"backbone_kwargs": kwargs, "freeze": 5})


def test_other_tile_sizes_are_resized_inside_the_model() -> None:
    enc = Encoder(encoder_spec("uni"), SMALL).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        direct = enc(torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear",
                                                     align_corners=False))
        assert torch.allclose(enc(x), direct, atol=1e-6)


def test_mpp_more_than_a_quarter_away_warns_with_both_figures(
        caplog: pytest.LogCaptureFixture) -> None:
    spec = encoder_spec("uni")
    assert check_mpp(spec, 0.6) is None
    with caplog.at_level(logging.WARNING):
        msg = check_mpp(spec, 2.0)
    assert msg and "2 µm/px" in msg and "0.5 µm/px" in msg and msg in caplog.text
    assert check_mpp(encoder_spec("timm:vit_small_patch16_224"), 2.0) is None
