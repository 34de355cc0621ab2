"""`infer` does what was asked or says why not: pixel sizes, honest reruns, model checks,
device fallback, saved tracebacks. Models here are small hand-built ONNX graphs (real
onnxruntime, no torch export), so each behaviour is cheap to provoke."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image
from test_infer import fake_he
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import ConfigError, ModelError
from histocsc.predict.engine import Engine
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array

MARKERS = ["CD133", "CD44"]
TILE, MPP = 32, 4.0


def make_model(path: Path, markers: list[str] = MARKERS, tile_px: int = TILE,
               width: int | None = None, scale: float = 1 / 255, offset: float = 0.0,
               graph_px: int | str = "h", thresholds: dict[str, float] | None = None) -> Path:
    """uint8 tiles -> per-tile channel means * scale + offset, first `width` channels."""
    width = len(markers) if width is None else width
    nodes = [
        helper.make_node("Cast", ["tiles"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["s"]),
        helper.make_node("Add", ["s", "offset"], ["a"]),
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["probabilities"]),
    ]
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [width]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(
            "tiles", TensorProto.UINT8, ["n", graph_px, graph_px if graph_px != "h" else "w", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {"markers": json.dumps(markers), "tile_px": str(tile_px), "mpp": str(MPP),
             "thresholds": json.dumps(thresholds or {m: 0.5 for m in markers})}
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    for sub in ("a", "b"):
        (root / sub).mkdir()
        write_pyramid_tiff_from_array(root / sub / "slide.tif", fake_he(0 if sub == "a" else 1),
                                      1.0, tile=128)
    return {"root": root, "a": root / "a" / "slide.tif", "b": root / "b" / "slide.tif",
            "model": make_model(root / "model.onnx")}


def infer(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["infer", *map(str, args)])
    return res.exit_code, res.output


def summary(out: Path, name: str = "slide") -> dict:
    return json.loads((out / name / "summary.json").read_text())


def test_slide_mpp_never_replaces_the_recorded_pixel_size(real_data: Path, tmp_path: Path,
                                                          ws: dict[str, Path]) -> None:
    """Item 1: the natural `--slide-mpp 0.25` keeps cmu-1-small-region at its own 0.499 µm/px."""
    svs = real_data / "svs" / "cmu-1-small-region.svs"
    code, out = infer(svs, "--model", ws["model"], "--out", tmp_path / "own")
    assert code == 0, out
    code, out = infer(svs, "--model", ws["model"], "--out", tmp_path / "fb", "--slide-mpp", 0.25)
    assert code == 0, out
    own, fallback = summary(tmp_path / "own", svs.stem), summary(tmp_path / "fb", svs.stem)
    assert fallback["slide"]["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert fallback["tiles"] == own["tiles"] > 0
    assert fallback["tissue_area_mm2"] == pytest.approx(own["tissue_area_mm2"])
    # --mpp is the working resolution: the model fixes it, so another value is refused
    code, out = infer(svs, "--model", ws["model"], "--out", tmp_path / "m", "--mpp", 0.25)
    assert code == 1 and "--slide-mpp" in out and "4 µm/px" in out
    # the explicit override applies, with a warning naming both values
    code, out = infer(svs, "--model", ws["model"], "--out", tmp_path / "ov",
                      "--override-slide-mpp", 0.25)
    assert code == 0 and "replaces the pixel size the file records (0.499" in out
    assert summary(tmp_path / "ov", svs.stem)["slide"]["mpp"] == 0.25


def test_rerun_skips_only_when_nothing_changed(ws: dict[str, Path], tmp_path: Path) -> None:
    """Item 2: a rerun recomputes, and says why, when the model or the pixel size changed."""
    out = tmp_path / "out"
    assert infer(ws["a"], "--model", ws["model"], "--out", out)[0] == 0
    done = out / "slide" / "summary.json"
    first = done.stat().st_mtime_ns
    code, text = infer(ws["a"], "--model", ws["model"], "--out", out)
    assert code == 0 and "skipped" in text and done.stat().st_mtime_ns == first
    retrained = make_model(tmp_path / "m2.onnx", thresholds={"CD133": 0.6, "CD44": 0.6})
    code, text = infer(ws["a"], "--model", retrained, "--out", out)
    assert code == 0 and "recomputing: the model changed" in text, text
    assert summary(out)["model"]["thresholds"]["CD133"] == 0.6
    code, text = infer(ws["a"], "--model", retrained, "--out", out, "--override-slide-mpp", 0.5)
    assert code == 0 and "recomputing: the slide pixel size used changed" in text, text
    assert summary(out)["slide"]["mpp"] == 0.5


def test_same_name_from_another_folder_is_refused(ws: dict[str, Path], tmp_path: Path) -> None:
    """Item 2: b/slide.tif into the --out of a/slide.tif is never silently skipped."""
    out = tmp_path / "out"
    assert infer(ws["a"], "--model", ws["model"], "--out", out)[0] == 0
    before = summary(out)["slide"]["checksum"]
    code, text = infer(ws["b"], "--model", ws["model"], "--out", out)
    assert code == 1 and str(ws["a"].resolve()) in text and "same name" in text
    assert summary(out)["slide"]["checksum"] == before
    code, text = infer(ws["b"], "--model", ws["model"], "--out", out, "--force")
    assert code == 0 and summary(out)["slide"]["path"] == str(ws["b"].resolve())
    code, text = infer(ws["a"], ws["b"], "--model", ws["model"], "--out", tmp_path / "both")
    assert code == 1 and "same name" in text


def test_overwrite_is_a_deprecated_alias_of_force(ws: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert infer(ws["a"], "--model", ws["model"], "--out", out)[0] == 0
    code, text = infer(ws["a"], "--model", ws["model"], "--out", out, "--overwrite")
    assert code == 0 and "deprecated" in text and "recomputing: --force" in text


def test_model_disagreeing_with_its_metadata_is_refused(ws: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Item 4: one output for two markers, a wrong tile size, outputs of 0-255."""
    one = make_model(tmp_path / "one.onnx", width=1)
    with pytest.raises(ModelError, match="2 marker"):
        Engine(one, device="cpu")
    wrong_px = make_model(tmp_path / "px.onnx", graph_px=64)
    with pytest.raises(ModelError, match="tile_px 32 but the graph takes tiles of 64"):
        Engine(wrong_px, device="cpu")
    raw = make_model(tmp_path / "raw.onnx", scale=1.0)
    code, text = infer(ws["a"], "--model", raw, "--out", tmp_path / "out")
    assert code == 1 and "not probabilities" in text
    assert not (tmp_path / "out" / "slide" / "summary.json").exists()


def test_geojson_class_for_both_markers(ws: dict[str, Path], tmp_path: Path) -> None:
    always = make_model(tmp_path / "pos.onnx", scale=0.0, offset=0.9)
    assert infer(ws["a"], "--model", always, "--out", tmp_path)[0] == 0
    gj = json.loads((tmp_path / "slide" / "tiles.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in gj["features"]}
    assert names == {"CD133+ CD44+"}


def test_failed_slide_keeps_its_traceback(ws: dict[str, Path], tmp_path: Path) -> None:
    raw = make_model(tmp_path / "raw.onnx", scale=1.0)
    code, text = infer(ws["a"], "--model", raw, "--out", tmp_path / "out")
    error = tmp_path / "out" / "slide" / "error.txt"
    assert code == 1 and str(error) in text and "Traceback" not in text
    assert "Traceback" in error.read_text() and "not probabilities" in error.read_text()
    res = CliRunner().invoke(app, ["--debug", "infer", str(ws["a"]), "--model", str(raw),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" in res.output


def test_auto_falls_back_to_cpu_when_cuda_is_listed_but_cannot_run(
        ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 6: this onnxruntime has no CUDA; listing it makes the real session start without it
    (as when cuDNN is missing). `auto` says so and uses the CPU; `cuda` stays strict."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a real CUDA provider is installed here")
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    engine = Engine(ws["model"], device="auto")
    assert engine.device == "cpu" and "uses the CPU instead" in engine.describe()
    assert engine.predict(np.zeros((2, TILE, TILE, 3), np.uint8)).shape == (2, 2)
    with pytest.raises(ConfigError, match="CUDA was asked for"):
        Engine(ws["model"], device="cuda")


def test_recursive_folders_and_image_folders(ws: dict[str, Path], tmp_path: Path) -> None:
    """Folders: --recursive finds sub-folders' slides; a folder of PNGs works with --slide-mpp."""
    nested = tmp_path / "cohort" / "batch1"
    nested.mkdir(parents=True)
    shutil.copy(ws["a"], nested / "deep.tif")
    code, text = infer(tmp_path / "cohort", "--model", ws["model"], "--out", tmp_path / "o1")
    assert code == 1 and "--recursive" in text
    code, text = infer(tmp_path / "cohort", "--model", ws["model"], "--out", tmp_path / "o1",
                       "--recursive")
    assert code == 0 and (tmp_path / "o1" / "deep" / "summary.json").is_file()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.fromarray(fake_he(2, 640, 480)).save(pngs / "field.png")
    code, text = infer(pngs, "--model", ws["model"], "--out", tmp_path / "o2")
    assert code == 1 and "--slide-mpp" in text
    code, text = infer(pngs, "--model", ws["model"], "--out", tmp_path / "o2", "--slide-mpp", 1)
    assert code == 0 and summary(tmp_path / "o2", "field")["slide"]["mpp"] == 1.0


def test_gpu_extra_and_the_swap_are_documented() -> None:
    """Item 6: onnxruntime-gpu comes as an extra, and the README says how to swap it in."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(req.startswith("onnxruntime-gpu") for req in extras["gpu"])
    readme = (root / "README.md").read_text()
    assert "pip install 'histocsc[gpu]'" in readme and "pip uninstall -y onnxruntime" in readme
