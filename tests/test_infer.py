"""Slide inference: outputs, geometry agreement, failures, reruns, shards and devices."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import ConfigError
from histocsc.learn.export import export_onnx
from histocsc.learn.model import build_model
from histocsc.predict.engine import Engine, choose_providers, shard
from histocsc.wsi.discover import find_slides
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array
from histocsc.wsi.slide import open_slide

TILE, MPP, SLIDE_MPP = 48, 2.0, 1.0
MARKERS = ["CD133", "CD44"]


def fake_he(seed: int, width: int = 1000, height: int = 760) -> np.ndarray:
    """An H&E-like test image: pink tissue blobs with purple nuclei on white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 244, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        center = (int(rng.integers(200, width - 200)), int(rng.integers(200, height - 200)))
        axes = (int(rng.integers(120, 220)), int(rng.integers(100, 180)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    tissue = mask.astype(bool)
    shade = rng.normal(0, 12, (height // 20 + 1, width // 20 + 1, 3))
    shade = cv2.resize(shade, (width, height), interpolation=cv2.INTER_CUBIC)
    pink = np.array([225, 140, 185]) + shade
    img[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    for _ in range(1500):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if tissue[y, x]:
            cv2.circle(img, (x, y), int(rng.integers(2, 5)), (90, 50, 140), -1)
    return img


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("infer")
    slides = root / "slides"
    slides.mkdir()
    for i in range(3):
        write_pyramid_tiff_from_array(slides / f"case{i}.tif", fake_he(i), SLIDE_MPP, tile=128)
    torch.manual_seed(0)
    model = build_model("tiny", len(MARKERS)).eval()
    meta = {"markers": MARKERS, "tile_px": TILE, "mpp": MPP, "backbone": "tiny",
            "mean": [0.8, 0.6, 0.75], "std": [0.1, 0.15, 0.1],
            "thresholds": {"CD133": 0.5, "CD44": 0.5}, "summary": {"note": "untrained"}}
    onnx_path = root / "model.onnx"
    export_onnx(model, meta, onnx_path)
    # put the thresholds at the median score so heatmaps have both classes
    engine = Engine(onnx_path, device="cpu")
    with open_slide(slides / "case0.tif") as s:
        sample = np.stack([s.read(x, 300, 96, 96, out_size=(TILE, TILE))
                           for x in range(200, 800, 40)])
    med = np.median(engine.predict(sample), axis=0)
    meta["thresholds"] = {m: float(v) for m, v in zip(MARKERS, med, strict=True)}
    export_onnx(model, meta, onnx_path)
    return {"root": root, "slides": slides, "model": onnx_path}


def infer(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["infer", *args])
    return res.exit_code, res.output


def test_infer_one_slide_writes_all_outputs(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "out_one"
    slide = workspace["slides"] / "case0.tif"
    code, output = infer([str(slide), "--model", str(workspace["model"]), "--out", str(out),
                          "--batch", "8", "--workers", "2"])
    assert code == 0, output
    assert "device: cpu" in output
    d = out / "case0"
    for name in ("heatmap_CD133.png", "heatmap_CD44.png", "heatmap_stem_like.png",
                 "score_grid.npy", "score_grid.json", "scores.csv", "tiles.geojson",
                 "summary.json"):
        assert (d / name).is_file(), name
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left
    with Image.open(d / "heatmap_CD133.png") as im:
        assert min(im.size) > 200
    summary = json.loads((d / "summary.json").read_text())
    rows = list(csv.DictReader((d / "scores.csv").open()))
    assert summary["tiles"] == len(rows) > 10
    assert 0.05 < summary["tissue_area_mm2"] < 0.76  # blobs cover part of a 1.0 x 0.76 mm slide
    for m in MARKERS:
        info = summary["markers"][m]
        probs = np.array([float(r[m]) for r in rows])
        assert info["mean_probability"] == pytest.approx(probs.mean(), abs=1e-5)
        assert 0.0 < info["area_fraction_above_threshold"] < 1.0
    assert summary["model"]["markers"] == MARKERS and summary["model"]["tile_px"] == TILE
    assert summary["timings_s"]["total"] > 0
    gj = json.loads((d / "tiles.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows)
    props = gj["features"][0]["properties"]
    assert props["objectType"] == "tile"
    assert set(MARKERS) <= set(props["measurements"]) and "name" in props["classification"]


def test_csv_geojson_and_grid_cell_point_at_the_same_pixels(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "out_geom"
    slide_path = workspace["slides"] / "case1.tif"
    code, output = infer([str(slide_path), "--model", str(workspace["model"]), "--out", str(out)])
    assert code == 0, output
    d = out / "case1"
    rows = list(csv.DictReader((d / "scores.csv").open()))
    features = json.loads((d / "tiles.geojson").read_text())["features"]
    grid = np.load(d / "score_grid.npy")
    geom = json.loads((d / "score_grid.json").read_text())
    assert geom["markers"] == MARKERS and list(grid.shape) == geom["shape"]
    assert np.isfinite(grid).all(axis=2).sum() == len(rows)
    sess = ort.InferenceSession(str(workspace["model"]), providers=["CPUExecutionProvider"])
    picks = [0, len(rows) // 2, len(rows) - 1]
    with open_slide(slide_path) as slide:
        for i in picks:
            r = rows[i]
            x, y, w, h = (int(r[k]) for k in ("x", "y", "w", "h"))
            # the GeoJSON polygon of the same tile
            ring = np.array(features[i]["geometry"]["coordinates"][0])
            assert (ring[:, 0].min(), ring[:, 1].min()) == (x, y)
            assert (ring[:, 0].max() - x, ring[:, 1].max() - y) == (w, h)
            # the grid cell holding the same scores, mapped back to level 0 by the sidecar
            row, col = int(r["row"]), int(r["col"])
            gx, gy = col * geom["step_px"], row * geom["step_px"]
            size = geom["tile_size_px"]
            assert (gx, gy, size, size) == (x, y, w, h)
            csv_probs = np.array([float(r[m]) for m in MARKERS])
            gj_probs = np.array([features[i]["properties"]["measurements"][m] for m in MARKERS])
            np.testing.assert_allclose(grid[row, col], csv_probs, atol=1e-6)
            np.testing.assert_allclose(gj_probs, csv_probs, atol=1e-6)
            # pixels read back from each description are the same, and score as recorded
            a = slide.read(x, y, w, h, out_size=(TILE, TILE))
            b = slide.read(int(gx), int(gy), int(size), int(size), out_size=(TILE, TILE))
            np.testing.assert_array_equal(a, b)
            again = sess.run(None, {"tiles": a[None]})[0][0]
            np.testing.assert_allclose(again, csv_probs, atol=2e-6)
    assert len({tuple(float(rows[i][m]) for m in MARKERS) for i in picks}) == len(picks)


def test_folder_with_corrupt_slide_continues_then_rerun_skips(workspace: dict[str, Path]) -> None:
    folder = workspace["root"] / "with_bad"
    folder.mkdir()
    shutil.copy(workspace["slides"] / "case2.tif", folder / "good.tif")
    (folder / "broken.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    out = workspace["root"] / "out_bad"
    code, output = infer([str(folder), "--model", str(workspace["model"]), "--out", str(out)])
    assert code == 1
    assert "broken.svs" in output and "1 done" in output and "1 failed" in output
    summary = out / "good" / "summary.json"
    assert summary.is_file() and not (out / "broken" / "summary.json").exists()
    before = summary.stat().st_mtime_ns
    code, output = infer([str(folder / "good.tif"), "--model", str(workspace["model"]),
                          "--out", str(out)])
    assert code == 0 and "skipped" in output
    assert summary.stat().st_mtime_ns == before


def test_shards_split_deterministically_and_cover_all(workspace: dict[str, Path]) -> None:
    names = [Path(f"/data/s{i:02d}.svs") for i in range(11)]
    parts = [shard(names, i, 3) for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(names)
    assert sum(len(p) for p in parts) == len(names) and {len(p) for p in parts} == {3, 4}
    assert shard(list(reversed(names)), 1, 3) == parts[1]
    out = workspace["root"] / "out_shard"
    done = []
    for i in range(2):
        code, output = infer([str(workspace["slides"]), "--model", str(workspace["model"]),
                              "--out", str(out), "--shard", f"{i}/2"])
        assert code == 0, output
        done.append({p.parent.name for p in out.glob("*/summary.json")})
    assert done[0] and done[0] < done[1]
    assert done[1] == {p.stem for p in find_slides([workspace["slides"]])}
    code, output = infer([str(workspace["slides"]), "--model", str(workspace["model"]),
                          "--out", str(out), "--shard", "2/2"])
    assert code == 1 and "0 <= I < N" in output


def test_cuda_without_onnxruntime_gpu_is_a_clear_error(workspace: dict[str, Path]) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        choose_providers("cuda")
    assert choose_providers("auto")[1] == "cpu"
    code, output = infer([str(workspace["slides"]), "--model", str(workspace["model"]),
                          "--out", str(workspace["root"] / "cuda"), "--device", "cuda"])
    assert code == 1 and "onnxruntime-gpu" in output


def test_not_a_model_is_a_clear_error(workspace: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, output = infer([str(workspace["slides"]), "--model", str(bad), "--out", str(tmp_path)])
    assert code == 1 and "bad.onnx" in output


class SmallNet(torch.nn.Module):
    """A few strided convolutions with mean+max pooling: trains in seconds on 32 px tiles."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(64, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def phantom_tiles(case_dir: Path, tile_px: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of a phantom H&E and their truth positive fractions per marker."""
    from histocsc.synthetic.truth import load_truth, truth_labels
    from histocsc.wsi.grid import TilesConfig, make_grid

    truth = load_truth(case_dir)
    with open_slide(case_dir / truth["he"]["path"]) as slide:
        grid = make_grid(slide, TilesConfig(tile_px=tile_px, mpp=mpp))
        t = grid.table
        tiles = np.stack([slide.read(t["x"][i], t["y"][i], t["w"][i], t["h"][i],
                                     out_size=(tile_px, tile_px)) for i in range(len(grid))])
    return tiles, np.stack([truth_labels(truth, m, grid) for m in MARKERS], 1)


def quick_train(tiles: np.ndarray, labels: np.ndarray, steps: int = 400) -> tuple:
    """Train SmallNet on tiles labelled positive where at least half the tile is positive."""
    torch.manual_seed(0)
    mean = (tiles.reshape(-1, 3).mean(0) / 255).tolist()
    std = (tiles.reshape(-1, 3).std(0) / 255).tolist()
    x = torch.from_numpy(tiles).float().div(255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.from_numpy((labels >= 0.5).astype(np.float32))
    x, y = torch.cat([x, x.flip(3), x.flip(2)]), torch.cat([y, y, y])
    model = SmallNet(len(MARKERS))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        # colour jitter: phantom cases differ in stain, as real slides do
        xb = x[idx] * (1 + 0.15 * torch.randn(64, 3, 1, 1)) + 0.3 * torch.randn(64, 3, 1, 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), mean, std


@pytest.mark.slow
def test_thresholded_heatmap_matches_truth_masks(tmp_path: Path) -> None:
    """Dice >= 0.7 per marker between the score grid above threshold and the phantom truth.

    The model is trained on this case's own tiles (read through make_grid + Slide.read), so
    the test checks that `histocsc infer` puts every score back on the right region of the
    slide (a transposed, shifted or reordered grid would fail), not how well the model
    generalises (see scripts/bench_int8.py for AUROC on an unseen case).
    """
    from histocsc.synthetic.generate import make_case
    from histocsc.synthetic.truth import load_truth, truth_labels

    tile_px, mpp = 64, 2.0
    case = make_case(tmp_path / "phantom", "case", 6, size_px=2560, mpp=1.0)
    tiles, fractions = phantom_tiles(case, tile_px, mpp)
    model, mean, std = quick_train(tiles, fractions, steps=600)
    meta = {"markers": MARKERS, "tile_px": tile_px, "mpp": mpp, "backbone": "small",
            "mean": mean, "std": std, "thresholds": {m: 0.5 for m in MARKERS},
            "summary": {"train_cases": ["case"]}}
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, meta, onnx_path)
    truth = load_truth(case)
    out = tmp_path / "out"
    code, output = infer([str(case / truth["he"]["path"]), "--model", str(onnx_path),
                          "--out", str(out)])
    assert code == 0, output
    d = out / Path(truth["he"]["path"]).stem
    grid = np.load(d / "score_grid.npy")
    geom = json.loads((d / "score_grid.json").read_text())
    rows, cols = np.nonzero(np.isfinite(grid[..., 0]))
    step, size = geom["step_px"], geom["tile_size_px"]
    boxes = np.stack([cols * step, rows * step, np.full(len(rows), size),
                      np.full(len(rows), size)], 1)
    for j, m in enumerate(MARKERS):
        predicted = grid[rows, cols, j] >= geom["thresholds"][m]
        positive = truth_labels(truth, m, boxes) >= 0.5
        assert positive.sum() >= 5, m
        dice = 2 * (predicted & positive).sum() / (predicted.sum() + positive.sum())
        assert dice >= 0.7, f"{m}: Dice {dice:.2f}"
    # the same scores shifted by half the grid would not match: the check has teeth
    shifted = np.roll(grid, grid.shape[1] // 2, axis=1)
    wrong = np.nan_to_num(shifted[rows, cols, 1], nan=0) >= geom["thresholds"][MARKERS[1]]
    positive = truth_labels(truth, MARKERS[1], boxes) >= 0.5
    assert 2 * (wrong & positive).sum() / (wrong.sum() + positive.sum()) < 0.7


def test_slide_without_pixel_size_needs_slide_mpp(workspace: dict[str, Path], real_data: Path,
                                            tmp_path: Path) -> None:
    """The real TCGA slide records no pixel size: a clear error, then --slide-mpp makes it work."""
    slide = real_data / "svs" / "tcga-cr-7395-01a-01-ts1.svs"
    code, output = infer([str(slide), "--model", str(workspace["model"]), "--out",
                          str(tmp_path)])
    assert code == 1 and "--slide-mpp" in output and "tcga-cr-7395" in output
    code, output = infer([str(slide), "--model", str(workspace["model"]), "--out",
                          str(tmp_path), "--slide-mpp", "0.5"])
    assert code == 0, output
    summary = json.loads((tmp_path / slide.stem / "summary.json").read_text())
    assert summary["slide"]["mpp"] == 0.5 and summary["tiles"] > 0


def test_slide_without_tissue_gives_empty_outputs(workspace: dict[str, Path],
                                                  tmp_path: Path) -> None:
    glass = tmp_path / "glass.tif"
    write_pyramid_tiff_from_array(glass, np.full((512, 640, 3), 243, np.uint8), SLIDE_MPP)
    code, output = infer([str(glass), "--model", str(workspace["model"]), "--out",
                          str(tmp_path / "out")])
    assert code == 0, output
    d = tmp_path / "out" / "glass"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["tiles"] == 0 and summary["tissue_area_mm2"] == 0
    assert (d / "heatmap_stem_like.png").is_file()
    assert list(csv.reader((d / "scores.csv").open())) == [
        ["x", "y", "w", "h", "row", "col", "tissue_fraction", *MARKERS]]
