"""IHC labels on phantom cases: label math with the true transform, `prepare` end to end with
registration, resumability, and bad input (unrelated IHC, missing file, unknown marker).

Truth: `truth_labels` gives the fraction of each tile inside the marker's positive region. A tile
is truly positive when at least half of it is in the region and truly negative when at most a
tenth is; tiles between are mixed and not scored. Measured labels are scored on the tiles outside
their own ignore band (label != -1); the ignore band must not swallow the clear tiles either.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import histocsc.ihc.labels as labels_module
from histocsc.cohort import read_cohort
from histocsc.config import load_config
from histocsc.errors import ConfigError, DataError
from histocsc.ihc.labels import (
    IhcMaps,
    LabelConfig,
    box_sums,
    label_slide,
    measure_tiles,
    to_labels,
)
from histocsc.io import read_json
from histocsc.pipeline.prepare import StageConfigs, run_cohort
from histocsc.synthetic.generate import make_cohort
from histocsc.synthetic.truth import load_truth, transform, truth_labels
from histocsc.wsi.grid import TileGrid, TilesConfig, make_grid
from histocsc.wsi.slide import open_slide

MARKERS = ("CD133", "CD44")
TRUE_POS, TRUE_NEG = 0.5, 0.1
TILES = TilesConfig(tile_px=128, mpp=0.5, min_tissue_fraction=0.5)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom cases, 3072 px at 0.5 µm/px, CD133 + CD44."""
    return make_cohort(tmp_path_factory.mktemp("phantom"), 3, size_px=3072, mpp=0.5, seed=4)


@pytest.fixture(scope="module")
def prepared(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """`prepare` run once (2 worker processes) on the phantom cohort."""
    out = tmp_path_factory.mktemp("prepared")
    results = run_cohort(cohort, out, StageConfigs(tiles=TILES), workers=2)
    return out, results


def truth_class(fraction: np.ndarray) -> np.ndarray:
    out = np.full(fraction.shape, -1)
    out[fraction >= TRUE_POS] = 1
    out[fraction <= TRUE_NEG] = 0
    return out


def score(pred: list[np.ndarray], truth: list[np.ndarray]) -> tuple[float, float, int]:
    """(agreement on tiles labelled by both, share of clear truth tiles labelled, n scored)."""
    p, t = np.concatenate(pred), truth_class(np.concatenate(truth))
    both = (p >= 0) & (t >= 0)
    return float((p[both] == t[both]).mean()), float(both.sum() / max(1, (t >= 0).sum())), int(
        both.sum()
    )


# -- label math ----------------------------------------------------------------------------------


def test_box_sums_match_direct_sums() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 50)).astype(np.float32)
    boxes = np.array([[0, 0, 50, 40], [3, 4, 10, 9], [45, 35, 60, 50], [-5, -5, 2, 2]])
    expected = [image.sum(), image[4:9, 3:10].sum(), image[35:, 45:].sum(), image[:2, :2].sum()]
    assert np.allclose(box_sums(image, boxes), expected, rtol=1e-5)


def test_label_bands() -> None:
    cfg = LabelConfig(positive_fraction=0.3, negative_fraction=0.2, min_tissue_fraction=0.2)
    frac = np.array([0.0, 0.2, 0.25, 0.3, 0.9, 0.9, np.nan])
    tissue = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.0])
    assert to_labels(frac, tissue, cfg).tolist() == [0, 0, -1, 1, 1, -1, -1]


def test_band_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="negative_fraction"):
        load_config(LabelConfig, None, {"negative_fraction": 0.5, "positive_fraction": 0.4})


def test_per_marker_thresholds() -> None:
    cd133 = {"positive_fraction": 0.1, "negative_fraction": 0.05}
    cfg = load_config(LabelConfig, None, {"per_marker": {"CD133": cd133}})
    assert cfg.for_marker("CD133").positive_fraction == 0.1
    assert cfg.for_marker("CD44").positive_fraction == cfg.positive_fraction == 0.3
    with pytest.raises(ConfigError, match="per_marker.CD44: negative_fraction"):
        load_config(LabelConfig, None, {"per_marker": {"CD44": {"negative_fraction": 0.5}}})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(LabelConfig, None, {"per_marker": {"CD44": {"dab": 0.5}}})


def test_shipped_yaml_is_the_default() -> None:
    assert load_config(LabelConfig, REPO / "configs" / "label.yaml") == LabelConfig()


def test_rotated_mirrored_footprints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic maps: a positive half-plane seen through a rotation + mirror."""
    cfg = LabelConfig(label_mpp=2.0)
    ihc_mpp, he_mpp = 1.0, 0.5
    tissue = np.ones((300, 300), np.uint8)  # IHC at label mpp: 600 x 600 IHC level-0 px
    positive = np.zeros_like(tissue)
    positive[:, 150:] = 1  # IHC x >= 300 (level 0) is positive
    theta = np.deg2rad(25)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre_he, centre_ihc = np.array([500.0, 500.0]), np.array([300.0, 300.0])

    def he_to_ihc(p: np.ndarray) -> np.ndarray:  # H&E px 0.5 µm -> IHC px 1 µm, mirrored in x
        q = (p - centre_he) * 0.5 @ rot.T
        q[:, 0] *= -1
        return q + centre_ihc

    xs, ys = np.meshgrid(np.arange(300, 700, 50), np.arange(300, 700, 50))
    xywh = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 50), np.full(xs.size, 50)], 1)
    maps = IhcMaps(tissue, positive, origin=(0.0, 0.0), scale=(ihc_mpp / 2.0, ihc_mpp / 2.0))
    got = measure_tiles(xywh, he_mpp, maps, he_to_ihc, cfg)
    centres = he_to_ihc(xywh[:, :2] + 25.0)
    clear = np.abs(centres[:, 0] - 300) > 25  # tile wholly on one side of the edge
    assert clear.sum() > 20
    assert np.array_equal(got.label[clear], (centres[clear, 0] > 300).astype(np.int8))
    assert np.allclose(got.tissue, 1.0)
    monkeypatch.setattr(labels_module, "BAND_ROWS", 7)  # many small bands: same numbers
    banded = measure_tiles(xywh, he_mpp, maps, he_to_ihc, cfg)
    assert np.allclose(banded.fraction, got.fraction, atol=1e-6)


def test_labels_match_truth_with_true_transform(cohort: Path) -> None:
    cfg = LabelConfig()
    pred: dict[str, list] = {m: [] for m in MARKERS}
    truth: dict[str, list] = {m: [] for m in MARKERS}
    for case in read_cohort(cohort).cases:
        t = load_truth(cohort.parent / case.case)
        with open_slide(case.he) as slide:
            grid = make_grid(slide, TILES)
        for m in MARKERS:
            he_to_ihc = transform(t, m).forward
            res = label_slide(grid.boxes, grid.slide_mpp, case.ihc[m], he_to_ihc, cfg)
            pred[m].append(res.label)
            truth[m].append(truth_labels(t, m, grid))
    for m in MARKERS:
        agree, coverage, n = score(pred[m], truth[m])
        print(f"true transform {m}: agreement {agree:.3f} on {n} tiles, coverage {coverage:.3f}")
        assert n >= 100
        assert agree >= 0.95, m
        assert coverage >= 0.8, m


# -- prepare end to end ----------------------------------------------------------------------------


def test_prepare_end_to_end(cohort: Path, prepared: tuple[Path, list[dict]]) -> None:
    out, results = prepared
    assert [r["status"] for r in results] == ["ok"] * 3, results
    pred: dict[str, list] = {m: [] for m in MARKERS}
    truth: dict[str, list] = {m: [] for m in MARKERS}
    for r in results:
        case_dir = out / r["case"]
        qc = read_json(case_dir / "qc.json")
        assert qc["registration_ok"] is True
        grid = TileGrid.load(case_dir)
        assert np.load(case_dir / "tiles.npy", mmap_mode="r").shape == (len(grid), 128, 128, 3)
        with (case_dir / "labels.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(grid) == r["tiles"]
        assert list(rows[0])[:5] == ["x", "y", "w", "h", "tissue_fraction"]
        t = load_truth(cohort.parent / r["case"])
        for m in MARKERS:
            assert (case_dir / "register" / m / "transform.json").is_file()
            assert (case_dir / f"label_map_{m}.png").is_file()
            pred[m].append(np.array([int(row[f"{m}_label"]) for row in rows]))
            truth[m].append(truth_labels(t, m, grid))
            assert qc["markers"][m]["positive"] == int((pred[m][-1] == 1).sum())
    for m in MARKERS:
        agree, coverage, n = score(pred[m], truth[m])
        print(f"prepare {m}: agreement {agree:.3f} on {n} tiles, coverage {coverage:.3f}")
        assert agree >= 0.95, m
        assert coverage >= 0.8, m
    summary = read_json(out / "summary.json")
    assert summary["markers"] == list(MARKERS) and len(summary["cases"]) == 3


def test_prepare_is_resumable(cohort: Path, prepared: tuple[Path, list[dict]]) -> None:
    out, _ = prepared
    transform_file = out / "case000" / "register" / "CD44" / "transform.json"
    before = transform_file.stat().st_mtime_ns
    again = run_cohort(cohort, out, StageConfigs(tiles=TILES), workers=1)
    assert all(r["reused"] for r in again)
    # new label thresholds: labels redone, registration and tiles kept
    cfgs = StageConfigs(tiles=TILES, label=LabelConfig(positive_fraction=0.5))
    relabelled = run_cohort(cohort, out, cfgs, workers=1)
    assert len(again) == len(relabelled) == 3
    assert not any(r["reused"] for r in relabelled)
    assert transform_file.stat().st_mtime_ns == before


# -- bad input -------------------------------------------------------------------------------------


def write_cohort(path: Path, rows: list[list[str]], header: str = "case,he,CD44,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_unrelated_ihc_and_missing_file_other_cases_go_on(cohort: Path, tmp_path: Path) -> None:
    src = cohort.parent

    def slide(case: str, name: str) -> str:
        return str(src / case / f"{case}_{name}.tiff")

    rows = [
        ["good", slide("case002", "HE"), slide("case002", "CD44"), "train"],
        ["mismatch", slide("case000", "HE"), slide("case001", "CD44"), "train"],  # other block
        ["missing", str(src / "case001" / "nope_HE.tiff"), slide("case001", "CD44"), "val"],
    ]
    table = write_cohort(tmp_path / "cohort.csv", rows)
    out = tmp_path / "out"
    results = {r["case"]: r for r in run_cohort(table, out, StageConfigs(tiles=TILES), workers=1)}
    assert results["good"]["status"] == "ok"
    bad = results["mismatch"]
    assert bad["status"] == "flagged" and bad["registration_ok"] is False
    assert bad["markers"]["CD44"]["error"]  # why it is flagged, in words
    qc = read_json(out / "mismatch" / "qc.json")
    assert qc["registration_ok"] is False
    with (out / "mismatch" / "labels.csv").open() as f:
        assert {row["CD44_label"] for row in csv.DictReader(f)} == {"-1"}
    assert results["missing"]["status"] == "failed"
    assert "nope_HE.tiff" in results["missing"]["error"]
    assert "missing" in results["missing"]["error"]


def test_marker_absent_from_cohort(cohort: Path, tmp_path: Path) -> None:
    cfgs = StageConfigs(tiles=TILES, label=LabelConfig(markers=["CD133", "SOX2"]))
    with pytest.raises(ConfigError, match=r"SOX2.*cohort.*CD133, CD44") as info:
        run_cohort(cohort, tmp_path / "out", cfgs)
    assert str(cohort) in str(info.value)


@pytest.mark.parametrize(
    ("header", "rows", "problem"),
    [
        ("case,CD44,split", [["a", "x.tiff", "train"]], "no 'he' column"),
        ("case,he,split", [["a", "x.tiff", "train"]], "no marker column"),
        ("case,he,CD44,split", [["a", "x.tiff", "y.tiff", "training"]], "split 'training'"),
        ("case,he,CD44,split", [["a", "x.tiff", "y.tiff", ""], ["a", "x", "y", ""]], "repeated"),
        ("case,he,CD44,split", [["a", "x.tiff", "train"]], "line 2 has 3 fields"),
    ],
)
def test_bad_cohort_tables(tmp_path: Path, header: str, rows: list, problem: str) -> None:
    table = write_cohort(tmp_path / "c.csv", rows, header)
    with pytest.raises(DataError, match=problem) as info:
        read_cohort(table)
    assert str(table) in str(info.value)


def test_cohort_paths_relative_to_csv(cohort: Path) -> None:
    parsed = read_cohort(cohort)
    assert parsed.markers == list(MARKERS)
    assert all(c.he.is_absolute() and c.he.is_file() for c in parsed.cases)
    assert [c.split for c in parsed.cases] == ["train", "val", "test"]


def test_cli_label_reuses_prepared_and_reports_failures(
    cohort: Path, prepared: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    out, _ = prepared
    ok = subprocess.run(
        [sys.executable, "-m", "histocsc", "label", "--cohort", str(cohort), "--out", str(out),
         "--markers", "CD44"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "case002" in ok.stdout and "ok" in ok.stdout
    table = write_cohort(tmp_path / "c.csv", [["lost", "nope.tiff", "nope44.tiff", "train"]])
    bad = subprocess.run(
        [sys.executable, "-m", "histocsc", "prepare", "--cohort", str(table),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "nope.tiff" in bad.stderr and "1 of 1 case(s) failed" in bad.stderr


@pytest.mark.parametrize(
    ("error", "ok"),
    [
        ({"tissue_overlap": 0.9, "residual_um_median": 4.0, "blocks": 40}, True),
        ({"tissue_overlap": 0.56, "residual_um_median": 4.0, "blocks": 3}, False),  # other block
        ({"tissue_overlap": 0.9, "residual_um_median": 80.0, "blocks": 40}, False),  # poor fit
        ({"tissue_overlap": 0.9, "residual_um_median": 80.0, "blocks": 2}, True),  # too few blocks
        ({}, False),  # no quality figures at all
    ],
)
def test_registration_qc(error: dict, ok: bool) -> None:
    from histocsc.pipeline.prepare import _registration_ok

    good, why = _registration_ok(error, LabelConfig())
    assert good is ok and bool(why) is not ok
