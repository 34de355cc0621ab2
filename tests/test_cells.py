"""Cell detection and cell labels: drawn nuclei found and classified by compartment, per-tile
counts with overlapping tiles, the label rules, the phantom's per-cell truth, and `prepare`
with a cell rule (labels.csv cell columns, worker processes)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial import cKDTree

from histocsc.config import load_config
from histocsc.errors import ConfigError
from histocsc.ihc.cell_labels import TileCells, chunks_under_tiles, count_in_tiles
from histocsc.ihc.cells import CellConfig, classify, compartment_for, detect_cells, hscore
from histocsc.ihc.label_config import LabelConfig
from histocsc.ihc.labels import MarkerLabels, rule_labels
from histocsc.synthetic.generate import make_case

H = np.array([0.65, 0.70, 0.29])  # hematoxylin OD vector (R, G, B)
D = np.array([0.27, 0.57, 0.78])  # DAB


def drawn_cells(n_side: int = 8, mpp: float = 0.5, seed: int = 0):
    """A grid of blue nuclei (7 µm, 20 µm apart) on pale tissue; odd columns get a brown
    membrane of DAB OD 0.6 at the cell's edge (the nucleus + 5 µm), every third row a brown
    nucleus of DAB OD 0.7. Returns RGB, centres, truths."""
    rng = np.random.default_rng(seed)
    pitch = int(20 / mpp)
    size = n_side * pitch
    h_od = np.full((size, size), 0.05, np.float32)
    d_od = np.full((size, size), 0.02, np.float32)
    centres, membrane, nuclear = [], [], []
    for j in range(n_side):
        for i in range(n_side):
            cx = int(i * pitch + pitch / 2 + rng.integers(-2, 3))
            cy = int(j * pitch + pitch / 2 + rng.integers(-2, 3))
            r = int(3.5 / mpp)
            cv2.circle(h_od, (cx, cy), r, 0.6, -1)
            if i % 2:
                cv2.circle(d_od, (cx, cy), int(8.0 / mpp), 0.6, int(1.5 / mpp))
            if j % 3 == 0:
                cv2.circle(d_od, (cx, cy), r, 0.7, -1)
            centres.append((cx, cy))
            membrane.append(bool(i % 2))
            nuclear.append(j % 3 == 0)
    od = h_od[..., None] * H + d_od[..., None] * D
    rgb = np.clip(255 * 10 ** (-od), 0, 255).round().astype(np.uint8)
    return rgb, np.array(centres, float), np.array(membrane), np.array(nuclear)


def test_drawn_nuclei_are_found_and_classified_by_compartment() -> None:
    rgb, centres, membrane, nuclear = drawn_cells()
    cfg = CellConfig()
    cells = detect_cells(rgb, 0.5, cfg)  # nuclei from the hematoxylin
    dist, idx = cKDTree(np.column_stack([cells.x, cells.y])).query(centres)
    assert len(cells) == len(centres) and (dist < 3).all()  # every nucleus, once
    assert (classify(cells, "membrane", cfg)[idx] > 0).tolist() == membrane.tolist()
    assert (classify(cells, "nuclear", cfg)[idx] > 0).tolist() == nuclear.tolist()
    assert 30 < np.median(cells.area_um2) < 45  # pi * 3.5^2 = 38.5 µm²


def test_touching_nuclei_are_split() -> None:
    h_od = np.full((80, 120), 0.05, np.float32)
    for cx in (40, 52, 64, 76):  # 4 nuclei of 6 µm at 0.5 µm/px, 6 µm apart: one blob
        cv2.circle(h_od, (cx, 40), 6, 0.6, -1)
    rgb = np.clip(255 * 10 ** (-(h_od[..., None] * H)), 0, 255).astype(np.uint8)
    assert len(detect_cells(rgb, 0.5, CellConfig(min_area_um2=5))) == 4


def test_thresholds_and_hscore() -> None:
    assert hscore(np.array([0, 1, 2, 3])) == 150.0
    assert np.isnan(hscore(np.array([], np.int8)))
    with pytest.raises(ConfigError, match="ascending"):
        load_config(LabelConfig, None, {"cells": {"thresholds": [0.4, 0.2, 0.6]}})
    assert compartment_for("Ki67", None) == "nuclear"
    assert compartment_for("Ki67", "membrane") == "membrane"
    assert compartment_for("SOX2", None) == "membrane"


def test_overlapping_tiles_count_each_cell_in_every_tile_holding_it() -> None:
    rng = np.random.default_rng(1)
    tiles = np.array([[x, y, 64, 64] for y in range(0, 256, 32) for x in range(0, 256, 32)])
    x, y = rng.uniform(-10, 300, 2000), rng.uniform(-10, 300, 2000)
    classes = rng.integers(0, 4, 2000)
    got = count_in_tiles(tiles, x, y, classes)
    for k, (tx, ty, w, h) in enumerate(tiles):
        inside = (x >= tx) & (x < tx + w) & (y >= ty) & (y < ty + h)
        assert got.by_class[k].tolist() == np.bincount(classes[inside], minlength=4).tolist()
    assert np.allclose(got.hscore[got.cells > 0],
                       [hscore(classes[(x >= a) & (x < a + 64) & (y >= b) & (y < b + 64)])
                        for a, b, _, _ in tiles[got.cells > 0]])


def test_chunks_only_where_tiles_and_tissue_are() -> None:
    centres = np.array([[100.0, 100.0]])
    chunks = chunks_under_tiles((0, 0, 4000, 4000), centres, 50, 1000, 30)
    assert [c.core for c in chunks] == [(0, 0, 1000, 1000)]
    assert chunks[0].read == (0, 0, 1030, 1030)
    assert not chunks_under_tiles((0, 0, 4000, 4000), centres, 50, 1000, 30,
                                  lambda *box: False)


def test_cell_rules_cut_band_and_min_cells() -> None:
    counts = np.array([[10, 0, 0, 0], [9, 1, 0, 0], [8, 2, 0, 0], [0, 0, 0, 3], [5, 0, 5, 0]])
    result = MarkerLabels(np.zeros(5), np.ones(5), np.zeros(5, np.int8),
                          cells=TileCells.from_counts(counts))
    cfg = LabelConfig(rule="positive_cells", positive_cell_fraction=0.2,
                      negative_cell_fraction=0.05, min_cells=5)
    assert rule_labels(result, cfg).tolist() == [0, -1, 1, -1, 1]  # 3 cells < min_cells
    cfg = LabelConfig(rule="hscore", positive_hscore=100, negative_hscore=10)
    assert rule_labels(result, cfg).tolist() == [0, 0, -1, -1, 1]  # H 0, 10, 20, (3 cells), 100
    with pytest.raises(ConfigError, match="negative_hscore"):
        load_config(LabelConfig, None, {"per_marker": {"Ki67": {"negative_hscore": 80,
                                                                "positive_hscore": 60}}})


def test_presets_and_tile_scaled_error_limit() -> None:
    cfg = LabelConfig()
    assert cfg.for_marker("Ki67").rule == "positive_cells"
    assert cfg.for_marker("pan-CK").compartment == "cytoplasm"
    assert cfg.for_marker("CD44").rule == "pixel_fraction" and not cfg.wants_cells()
    assert cfg.error_limit_um(160.0) == 40.0  # 25 % of 32 px tiles at 5 µm/px
    assert LabelConfig(max_registration_error_um=45).error_limit_um(160.0) == 45.0


@pytest.fixture(scope="module")
def ki67_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cells")
    return make_case(out, "c0", seed=5, size_px=1024, mpp=0.5, markers=("Ki67",),
                     cell_truth=True)


def test_phantom_writes_its_cells_and_detection_finds_them(ki67_case: Path) -> None:
    from histocsc.synthetic.truth import load_truth
    from histocsc.wsi.slide import open_slide

    truth = load_truth(ki67_case)
    info = truth["markers"]["Ki67"]
    assert info["compartment"] == "nuclear"
    table = np.loadtxt(ki67_case / info["cells"], delimiter=",", skiprows=1, ndmin=2)
    assert len(table) > 200 and 0 < table[:, 5].mean() < 1
    with open_slide(ki67_case / info["ihc"]["path"]) as slide:
        rgb = slide.read(0, 0, *slide.dimensions)
    cfg = CellConfig()
    cells = detect_cells(rgb, 0.5, cfg, nuclear=True)
    sep = table[:, 8] > 0
    dist, idx = cKDTree(np.column_stack([cells.x, cells.y])).query(table[sep, :2])
    assert (dist < 8).mean() > 0.85  # drawn nuclei found (4 µm)
    found = dist < 8
    calls = classify(cells, "nuclear", cfg)[idx[found]] > 0
    assert (calls == (table[sep][found, 5] > 0)).mean() > 0.9


def test_prepare_with_a_cell_rule_writes_cell_columns(ki67_case: Path, tmp_path: Path) -> None:
    from histocsc.pipeline.prepare import StageConfigs, run_cohort
    from histocsc.wsi.grid import TilesConfig

    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"case,he,Ki67\nc0,{ki67_case / 'c0_HE.tiff'},"
                      f"{ki67_case / 'c0_Ki67.tiff'}\n")
    cfgs = StageConfigs(tiles=TilesConfig(tile_px=128, mpp=1.0),
                        label=LabelConfig(cell_workers=2))
    (summary,) = run_cohort(cohort, tmp_path / "out", cfgs)
    qc = summary["markers"]["Ki67"]
    assert qc["registration_error_limit_um"] == 32.0 and qc["registration_confidence"]
    with (tmp_path / "out" / "c0" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    cells = np.array([float(r["Ki67_cells"]) for r in rows])
    positive = np.array([float(r["Ki67_positive_cells"]) for r in rows])
    assert cells.sum() > 100 and (positive <= cells).all() and positive.sum() > 0
    label = np.array([int(r["Ki67_label"]) for r in rows])
    if summary["registration_ok"]:
        share = positive / np.maximum(cells, 1)
        assert (share[label == 1] >= 0.1).all() and (share[label == 0] <= 0.02).all()
