"""Encoder + head as one ONNX graph: uint8 tiles in; resize, normalise, encoder, head and
calibration inside; parity with PyTorch at any batch size; an `embeddings` output for
`infer --features`; ONNX external data that infer and the Triton repository load."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_infer import fake_he
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.learn.export import PARITY_TOL, TileModel, export_onnx, synthetic_check_tiles
from histocsc.learn.metadata import EMBEDDINGS, OUTPUT, read_metadata
from histocsc.learn.model import build_model
from histocsc.learn.triton_repo import write_triton_repo
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array

MARKERS = ["CD133", "CD44"]


def meta(tile_px: int, mpp: float, backbone: str) -> dict:
    return {"markers": MARKERS, "tile_px": tile_px, "mpp": mpp, "backbone": backbone,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "calibration": {"CD133": {"shift": 0.3, "temperature": 1.5}},
            "encoder": {"name": backbone, "embedding_dim": 384}}


def run(path: Path, tiles: np.ndarray, names: list[str]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(names, {"tiles": tiles})


@pytest.mark.slow
def test_vit_s16_graph_matches_pytorch_at_any_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("timm:vit_small_patch16_224", 2).eval()
    m = meta(224, 0.5, "timm:vit_small_patch16_224")
    result = export_onnx(model, m, tmp_path / "vit.onnx", embeddings=True,
                         check_tiles=synthetic_check_tiles(224, 3))
    assert result.max_abs_diff <= PARITY_TOL
    wrapped = TileModel(model, m["mean"], m["std"], [0.3, 0.0], [1.5, 1.0], embeddings=True)
    for n in (1, 5):
        tiles = synthetic_check_tiles(224, n, seed=n)
        probs, emb = run(result.fp32, tiles, [OUTPUT, EMBEDDINGS])
        with torch.no_grad():
            want_p, want_e = wrapped(torch.from_numpy(tiles))
        assert probs.shape == (n, 2) and emb.shape == (n, 384)
        assert np.abs(probs - want_p.numpy()).max() <= PARITY_TOL
        assert np.abs(emb - want_e.numpy()).max() <= PARITY_TOL
    props = read_metadata(result.fp32)
    assert props["outputs"] == [OUTPUT, EMBEDDINGS] and props["encoder"]["embedding_dim"] == 384


def test_small_vit_graph_resizes_and_runs_infer_and_triton_from_external_data(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": 112, "depth": 1, "embed_dim": 48, "num_heads": 2}
    model = build_model("uni", 2, encoder_options={"backbone_kwargs": kwargs}).eval()
    m = meta(48, 2.0, "uni")
    result = export_onnx(model, m, tmp_path / "m.onnx", embeddings=True, external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and data.stat().st_size > result.fp32.stat().st_size
    tiles = synthetic_check_tiles(48, 4)
    with torch.no_grad():  # the graph resizes 48 px tiles to the encoder's 112 px itself
        want = TileModel(model, m["mean"], m["std"], [0.3, 0.0], [1.5, 1.0])(
            torch.from_numpy(tiles)).numpy()
    assert np.abs(run(result.fp32, tiles, [OUTPUT])[0] - want).max() <= PARITY_TOL

    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid_tiff_from_array(slides / "s0.tif", fake_he(0), 1.0, tile=128)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["infer", str(slides / "s0.tif"), "--model",
                                   str(result.fp32), "--out", str(out), "--device", "cpu",
                                   "--features"])
    assert res.exit_code == 0, res.output
    with h5py.File(out / "s0" / "features.h5") as f:
        feats, coords = np.asarray(f["features"]), np.asarray(f["coords"])
        assert f.attrs["encoder"] == "uni" and f.attrs["tile_px"] == 48
    scores = np.loadtxt(out / "s0" / "scores.csv", delimiter=",", skiprows=1, ndmin=2)
    assert feats.shape == (len(scores), 48) and (coords == scores[:, :2]).all()

    repo = write_triton_repo(result.fp32, tmp_path / "triton")
    assert (repo / "1" / "m.onnx.data").is_file()
    got = run(repo / "1" / "model.onnx", tiles, [OUTPUT])[0]
    assert np.abs(got - want).max() <= PARITY_TOL


def test_embeddings_need_an_encoder_model(tmp_path: Path) -> None:
    from histocsc.errors import ModelError

    with pytest.raises(ModelError, match="--embeddings needs an encoder model"):
        export_onnx(build_model("tiny", 2), meta(32, 2.0, "tiny"), tmp_path / "t.onnx",
                    embeddings=True)
