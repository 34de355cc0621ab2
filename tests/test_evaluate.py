"""`histocsc evaluate` against the three truth kinds: phantom masks, QuPath GeoJSON, IHC labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import DataError
from histocsc.evaluate.metrics import evaluate
from histocsc.evaluate.truth import marker_of
from histocsc.predict.outputs import Tiles, write_outputs

MARKERS = ["CD133", "CD44"]
SIZE, TILE0, STEP0 = 1024, 64, 32  # slide px (1 µm/px), tile and stride in level-0 px


def tiles_over(size: int = SIZE) -> Tiles:
    """Every tile of a half-overlapping lattice over a size x size slide."""
    pos = np.arange(0, size - TILE0 + 1, STEP0)
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    n = xx.size
    return Tiles(x=xx.ravel(), y=yy.ravel(), w=np.full(n, TILE0), h=np.full(n, TILE0),
                 tissue_fraction=np.ones(n), slide_width=size, slide_height=size, slide_mpp=1.0,
                 mpp=2.0, tile_px=TILE0 // 2, step=STEP0, size=TILE0)


def box_means(mask: np.ndarray, tiles: Tiles) -> np.ndarray:
    """Fraction of each tile inside a full-resolution boolean mask."""
    return np.array([mask[y:y + h, x:x + w].mean()
                     for x, y, w, h in zip(tiles.x, tiles.y, tiles.w, tiles.h, strict=True)])


def write_prediction(out: Path, probs: np.ndarray, size: int = SIZE) -> Path:
    """A `histocsc infer` slide folder with the given per-tile probabilities (no model needed)."""
    tiles = tiles_over(size)
    model = {"markers": MARKERS, "thresholds": {m: 0.5 for m in MARKERS}}
    thumb = np.full((size // 8, size // 8, 3), 230, np.uint8)
    summary = write_outputs(out, tiles, probs.astype(np.float32), thumb, 8.0, model,
                            {"name": out.name, "width": size, "height": size}, {})
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def shapes_mask(size: int = SIZE) -> dict[str, np.ndarray]:
    """Full-resolution truth: CD133 a square with a hole, CD44 two disks."""
    cd133 = np.zeros((size, size), np.uint8)
    cd133[256:640, 256:640] = 1
    cd133[384:512, 384:512] = 0
    cd44 = np.zeros((size, size), np.uint8)
    cv2.circle(cd44, (760, 300), 120, 1, -1)
    cv2.circle(cd44, (300, 820), 90, 1, -1)
    return {"CD133": cd133.astype(bool), "CD44": cd44.astype(bool)}


def qupath_geojson(path: Path, shift: float = 0.0, names: tuple[str, str] = ("CD133", "CD44+"),
                   ) -> Path:
    """Annotations as QuPath exports them: a FeatureCollection of Polygon / MultiPolygon
    features with properties.objectType and properties.classification.name (and a class that
    names no marker, which is ignored)."""
    def ring(points: list[tuple[float, float]]) -> list[list[float]]:
        pts = [[x + shift, y + shift] for x, y in points]
        return [*pts, pts[0]]

    def circle(cx: float, cy: float, r: float) -> list[list[float]]:
        a = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        return ring(list(zip(cx + r * np.cos(a), cy + r * np.sin(a), strict=True)))

    def feature(geometry: dict, name: str) -> dict:
        return {"type": "Feature", "id": f"id-{name}", "geometry": geometry,
                "properties": {"objectType": "annotation", "isLocked": False,
                               "classification": {"name": name, "color": [200, 0, 0]}}}

    features = [
        feature({"type": "Polygon", "coordinates": [
            ring([(256, 256), (640, 256), (640, 640), (256, 640)]),
            ring([(384, 384), (512, 384), (512, 512), (384, 512)])]}, names[0]),
        feature({"type": "MultiPolygon", "coordinates": [
            [circle(760, 300, 120)], [circle(300, 820, 90)]]}, names[1]),
        feature({"type": "Polygon", "coordinates": [ring([(0, 0), (900, 0), (900, 900)])]},
                "Tumor"),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    truth = shapes_mask()
    tiles = tiles_over()
    right = np.stack([box_means(truth[m], tiles) for m in MARKERS], 1)
    return {"root": root, "right": write_prediction(root / "right", right),
            "wrong": write_prediction(root / "wrong", 1.0 - right),
            "geojson": qupath_geojson(root / "annotations.geojson")}


def test_qupath_geojson_truth(shapes: dict[str, Path]) -> None:
    good = evaluate(shapes["right"], shapes["geojson"], shapes["root"] / "ev_right")
    bad = evaluate(shapes["wrong"], shapes["geojson"], shapes["root"] / "ev_wrong")
    assert good["truth"]["kind"] == "qupath_geojson" and set(good["markers"]) == set(MARKERS)
    for m in MARKERS:
        g, b = good["markers"][m], bad["markers"][m]
        assert g["tile"]["dice"] > 0.9 and g["pixel"]["dice"] > 0.9 and g["tile"]["auroc"] > 0.99
        assert g["model_tiles"]["dice"] > 0.9 and 0 < g["tile"]["iou"] <= g["tile"]["dice"]
        assert b["tile"]["dice"] < 0.1 and b["pixel"]["dice"] < 0.1 and b["tile"]["auroc"] < 0.1
        assert g["tile"]["ece"] < b["tile"]["ece"]
        assert sum(row["count"] for row in g["reliability"]) == g["tile"]["cells"]
    # the hole of the CD133 polygon is truth-negative: the pixel figure would drop otherwise
    out = shapes["root"] / "ev_right"
    for name in ("evaluation.json", "reliability_CD133.png", "compare_CD133.png",
                 "compare_CD44.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["markers"]["CD44"]["pixel"]["dice"] == good["markers"]["CD44"]["pixel"]["dice"]


def test_qupath_class_names() -> None:
    assert marker_of("CD133", MARKERS) == "CD133"
    assert marker_of("cd44+", MARKERS) == "CD44"
    assert marker_of("CD44: Positive", MARKERS) == "CD44"
    assert marker_of("Tumor", MARKERS) is None


def test_truth_outside_the_slide_or_naming_no_marker_is_a_clear_error(
    shapes: dict[str, Path],
) -> None:
    far = qupath_geojson(shapes["root"] / "far.geojson", shift=5000)
    with pytest.raises(DataError, match="outside the 1024 x 1024 px slide"):
        evaluate(shapes["right"], far, shapes["root"] / "ev_far")
    # one polygon off the slide among good ones is an error too, naming that feature
    data = json.loads(shapes["geojson"].read_text())
    data["features"].append({"type": "Feature", "id": "stray", "properties": {
        "classification": {"name": "CD44"}}, "geometry": {"type": "Polygon", "coordinates": [
            [[8000, 100], [18500, 100], [18500, 600], [8000, 100]]]}})
    stray = shapes["root"] / "stray.geojson"
    stray.write_text(json.dumps(data))
    res = CliRunner().invoke(app, ["evaluate", str(shapes["right"]), "--truth", str(stray)])
    assert res.exit_code == 1, res.output
    assert "feature 3 (id stray)" in res.output and "x 8000-18500" in res.output
    assert "outside the 1024 x 1024 px slide" in res.output
    other = qupath_geojson(shapes["root"] / "other.geojson", names=("Tumor", "Stroma"))
    res = CliRunner().invoke(app, ["evaluate", str(shapes["right"]), "--truth", str(other)])
    assert res.exit_code == 1
    assert "names no marker of the model (CD133, CD44)" in res.output and "Stroma" in res.output
    res = CliRunner().invoke(app, ["evaluate", str(shapes["root"]), "--truth", str(other)])
    assert res.exit_code == 1 and "not a `histocsc infer` slide folder" in res.output


def test_ihc_label_map_of_a_prepared_case(shapes: dict[str, Path]) -> None:
    """A prepared case: labels.csv (1 where >= 0.3 positive, 0 where <= 0.2, else -1) and
    grid.json, as `histocsc prepare` writes them; a band of tiles without IHC is unknown."""
    case = shapes["root"] / "prepared" / "case000"
    case.mkdir(parents=True)
    truth = shapes_mask()
    tiles = tiles_over()
    (case / "grid.json").write_text(json.dumps({"slide_width": SIZE, "slide_height": SIZE}))
    with (case / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "w", "h", "tissue_fraction",
                    *(f"{m}_{k}" for m in MARKERS for k in ("fraction", "label"))])
        for i in range(len(tiles.x)):
            row: list[object] = [tiles.x[i], tiles.y[i], TILE0, TILE0, 1.0]
            for m in MARKERS:
                frac = truth[m][tiles.y[i]:tiles.y[i] + TILE0, tiles.x[i]:tiles.x[i] + TILE0].mean()
                label = 1 if frac >= 0.3 else 0 if frac <= 0.2 else -1
                row += [f"{frac:.4f}", -1 if tiles.x[i] >= 900 else label]
            w.writerow(row)
    result = CliRunner().invoke(app, ["evaluate", str(shapes["right"]), "--truth", str(case),
                                      "--out", str(shapes["root"] / "ev_ihc")])
    assert result.exit_code == 0, result.output
    ev = json.loads((shapes["root"] / "ev_ihc" / "evaluation.json").read_text())
    assert ev["truth"]["kind"] == "ihc_labels"
    for m in MARKERS:
        assert ev["markers"][m]["tile"]["dice"] > 0.8 and ev["markers"][m]["tile"]["auroc"] > 0.98
    whole = evaluate(shapes["right"], shapes["geojson"], shapes["root"] / "ev_again")
    assert ev["markers"]["CD44"]["tile"]["cells"] < whole["markers"]["CD44"]["tile"]["cells"]
    # a marker the case has no IHC for (all -1) is left out, not an error
    rows = list(csv.reader((case / "labels.csv").open()))
    col = rows[0].index("CD44_label")
    noihc = shapes["root"] / "prepared" / "noihc"
    noihc.mkdir()
    (noihc / "grid.json").write_text((case / "grid.json").read_text())
    with (noihc / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *([*r[:col], "-1", *r[col + 1:]] for r in rows[1:])])
    assert set(evaluate(shapes["right"], noihc, shapes["root"] / "ev_noihc")["markers"]) == {
        "CD133"}
    bad = shapes["root"] / "prepared" / "other"
    bad.mkdir()
    (bad / "grid.json").write_text(json.dumps({"slide_width": 2048, "slide_height": 2048}))
    (bad / "labels.csv").write_text((case / "labels.csv").read_text())
    with pytest.raises(DataError, match="does not overlap this slide"):
        evaluate(shapes["right"], bad, shapes["root"] / "ev_bad")


def test_phantom_truth_masks(tmp_path: Path) -> None:
    from histocsc.synthetic.generate import make_case
    from histocsc.synthetic.truth import load_truth, truth_labels

    case = make_case(tmp_path / "phantom", "case000", seed=31, size_px=SIZE, mpp=1.0,
                     markers=MARKERS, workers=1)
    truth = load_truth(case)
    tiles = tiles_over()
    boxes = np.stack([tiles.x, tiles.y, tiles.w, tiles.h], 1)
    right = np.stack([truth_labels(truth, m, boxes) for m in MARKERS], 1)
    pred = write_prediction(tmp_path / "pred", right)
    ev = evaluate(pred, case, tmp_path / "ev")
    assert ev["truth"]["kind"] == "phantom"
    for m in MARKERS:
        row = ev["markers"][m]
        assert row["tile"]["truth_positive"] > 0
        assert row["tile"]["dice"] > 0.85 and row["pixel"]["dice"] > 0.75
    small = write_prediction(tmp_path / "small", right[: len(tiles_over(512).x)], size=512)
    with pytest.raises(DataError, match="does not overlap this slide"):
        evaluate(small, case, tmp_path / "ev_small")
