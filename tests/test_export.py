"""ONNX export: uint8 graph, parity with PyTorch on real tiles, metadata, int8 and fp16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import DataError, ModelError
from histocsc.learn.export import PARITY_TOL, TileModel, export_onnx, load_tiles, read_metadata
from histocsc.learn.model import build_model
from histocsc.wsi.slide import open_slide

TILE = 64
META = {
    "markers": ["CD133", "CD44"],
    "tile_px": TILE,
    "mpp": 1.0,
    "backbone": "tiny",
    "mean": [0.70, 0.55, 0.70],
    "std": [0.15, 0.20, 0.12],
    "thresholds": {"CD133": 0.45, "CD44": 0.6},
    "summary": {"cases": 3, "val_auroc": {"CD133": 0.9}},
}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny", 2)
    # non-trivial batch-norm statistics so normalisation mistakes would show
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def real_tiles(real_data: Path) -> np.ndarray:
    """Crops of the real H&E tile images and of the real SVS slide, at the model's tile size."""
    tiles = list(load_tiles(real_data / "he-tiles", TILE, limit=40))
    with open_slide(real_data / "svs" / "cmu-1-small-region.svs") as slide:
        for x, y in [(600, 600), (1000, 1500), (1400, 2200), (100, 100)]:
            tiles.append(slide.read(x, y, 2 * TILE, 2 * TILE, out_size=(TILE, TILE)))
    return np.stack(tiles)


def run_onnx(path: Path, tiles: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"tiles": tiles})[0]


def torch_probs(model: nn.Module, tiles: np.ndarray) -> np.ndarray:
    """The reference computed the plain way: /255, normalise, NCHW, model, sigmoid."""
    x = torch.from_numpy(tiles).float().div(255).permute(0, 3, 1, 2)
    mean = torch.tensor(META["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(META["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.sigmoid(model((x - mean) / std)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, real_tiles: np.ndarray):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    model = tiny_model()
    result = export_onnx(model, META, out, int8=True, calibration=real_tiles, fp16=True,
                         check_tiles=real_tiles)
    return model, result


def test_fp32_parity_on_real_tiles(exported, real_tiles: np.ndarray) -> None:
    model, result = exported
    got = run_onnx(result.fp32, real_tiles)
    want = torch_probs(model, real_tiles)
    assert got.shape == (len(real_tiles), 2) and got.dtype == np.float32
    assert np.abs(got - want).max() <= PARITY_TOL
    assert result.max_abs_diff <= PARITY_TOL
    assert want.std() > 1e-3  # the check is not on a constant output


def test_graph_takes_uint8_nhwc_with_dynamic_batch(exported, real_tiles: np.ndarray) -> None:
    _, result = exported
    sess = ort.InferenceSession(str(result.fp32), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "tiles" and inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [TILE, TILE, 3] and not isinstance(inp.shape[0], int)
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]
    one = sess.run(None, {"tiles": real_tiles[:1]})[0]
    five = sess.run(None, {"tiles": real_tiles[:5]})[0]
    np.testing.assert_allclose(one[0], five[0], atol=1e-5)


def test_metadata_props(exported) -> None:
    _, result = exported
    props = {p.key: p.value for p in onnx.load(str(result.fp32)).metadata_props}
    for key in ("markers", "tile_px", "mpp", "thresholds", "histocsc_version",
                "training_summary"):
        assert key in props
    assert json.loads(props["markers"]) == ["CD133", "CD44"]
    meta = read_metadata(result.fp32)
    assert meta["tile_px"] == TILE and meta["mpp"] == 1.0
    assert meta["thresholds"] == META["thresholds"]
    assert meta["training_summary"] == META["summary"]
    assert read_metadata(result.int8)["precision"] == "int8"


def test_int8_is_quantized_and_close(exported, real_tiles: np.ndarray) -> None:
    model, result = exported
    ops = {n.op_type for n in onnx.load(str(result.int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    got = run_onnx(result.int8, real_tiles)
    want = torch_probs(model, real_tiles)
    assert np.abs(got - want).max() < 0.05
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9


def test_fp16_close(exported, real_tiles: np.ndarray) -> None:
    model, result = exported
    got = run_onnx(result.fp16, real_tiles)
    assert np.abs(got - torch_probs(model, real_tiles)).max() < 1e-2


class Noisy(nn.Module):
    """Gives different outputs on every call, so ONNX can never match PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :2] + 5 * torch.rand(x.shape[0], 2)


def test_parity_failure_raises_and_removes(tmp_path: Path) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelError, match="differs from PyTorch"):
        export_onnx(Noisy(), META, out)
    assert not out.exists()


def test_metadata_missing_key_is_model_error(tmp_path: Path) -> None:
    meta = {k: v for k, v in META.items() if k != "tile_px"}
    with pytest.raises(ModelError, match="tile_px"):
        export_onnx(tiny_model(), meta, tmp_path / "m.onnx")


def test_int8_without_calibration_and_bad_calibration(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="calibration"):
        export_onnx(tiny_model(), META, tmp_path / "m.onnx", int8=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        export_onnx(tiny_model(), META, tmp_path / "m.onnx", int8=True,
                    calibration=tmp_path / "empty")


def test_tile_model_matches_manual_preprocessing() -> None:
    model = tiny_model(1)
    tiles = np.random.default_rng(0).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    wrapped = TileModel(model, META["mean"], META["std"]).eval()
    with torch.no_grad():
        got = wrapped(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(got, torch_probs(model, tiles), atol=1e-6)


def write_checkpoint(path: Path, model: nn.Module) -> Path:
    """A checkpoint in the training run format read by histocsc.learn.model.load_trained."""
    path.mkdir(parents=True, exist_ok=True)
    ckpt = path / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(exist_ok=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "histocsc": dict(META)}, ckpt)
    return path


def test_export_cli(tmp_path: Path, real_data: Path) -> None:
    model = tiny_model(2)
    run = write_checkpoint(tmp_path / "run", model)
    out = tmp_path / "cli" / "model.onnx"
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(run), "--out", str(out), "--int8", "--calibration",
                              str(real_data / "he-tiles")])
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.with_name("model.int8.onnx").is_file()
    assert "max |ONNX - PyTorch|" in res.output
    tiles = load_tiles(real_data / "he-tiles", TILE, limit=8)
    np.testing.assert_allclose(run_onnx(out, tiles), torch_probs(model, tiles), atol=PARITY_TOL)

    res = runner.invoke(app, ["export", str(run), "--out", str(out), "--int8"])
    assert res.exit_code == 1 and "--calibration" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 1 and "nope" in res.output
