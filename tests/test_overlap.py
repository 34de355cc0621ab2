"""Overlapping inference: stride from --overlap/--stride, blended score grid, reruns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_infer import MARKERS, infer, workspace  # noqa: F401 - the shared slides and model

from histocsc.errors import ConfigError
from histocsc.predict.blend import blend_grid, stride_px, window_weights
from histocsc.predict.outputs import Tiles, score_grid


def lattice(positions: list[tuple[int, int]], step: float, size: float) -> Tiles:
    xy = np.array(positions, np.int64) * int(step)
    n = len(positions)
    return Tiles(x=xy[:, 1], y=xy[:, 0], w=np.full(n, int(size)), h=np.full(n, int(size)),
                 tissue_fraction=np.ones(n), slide_width=1000, slide_height=800, slide_mpp=1.0,
                 mpp=2.0, tile_px=int(size // 2), step=step, size=size)


def test_stride_from_overlap_or_stride() -> None:
    assert stride_px(64) == 64
    assert stride_px(64, overlap=0.5) == 32
    assert stride_px(224, overlap=0.75) == 56
    assert stride_px(64, stride=16) == 16
    for bad in ({"overlap": 1.0}, {"overlap": -0.1}, {"stride": 0}, {"stride": 65},
                {"overlap": 0.5, "stride": 32}):
        with pytest.raises(ConfigError):
            stride_px(64, **bad)


def test_without_overlap_the_grid_is_the_tile_scores() -> None:
    tiles = lattice([(0, 0), (0, 1), (2, 3)], step=100, size=100)
    probs = np.array([[0.1, 0.9], [0.4, 0.2], [0.7, 0.3]], np.float32)
    np.testing.assert_array_equal(blend_grid(tiles, probs), score_grid(tiles, probs))


def test_half_overlap_cells_are_the_mean_of_the_covering_tiles() -> None:
    # tiles 2 cells wide at (0,0), (0,1), (1,0): cell (1,1) is covered by all three
    tiles = lattice([(0, 0), (0, 1), (1, 0)], step=50, size=100)
    probs = np.array([[0.9], [0.3], [0.0]], np.float32)
    grid = blend_grid(tiles, probs)[..., 0]
    assert grid[0, 0] == pytest.approx(0.9)  # one tile
    assert grid[0, 1] == pytest.approx(0.6)  # tiles (0,0) and (0,1)
    assert grid[1, 1] == pytest.approx(0.4)  # all three
    assert grid[0, 2] == pytest.approx(0.3)
    assert np.isnan(grid[2, 2]) and np.isnan(grid[0, 3])
    # a quarter-stride window weights a cell by where it lies in each tile: centre beats edge
    w = window_weights(size=100, step=25)
    assert len(w) == 4 and w[1] > w[0] > 0
    np.testing.assert_allclose(w, w[::-1])


def test_infer_with_overlap_blends_and_reruns_only_when_the_stride_changes(
    workspace: dict[str, Path],  # noqa: F811
) -> None:
    slide = workspace["slides"] / "case0.tif"
    out = workspace["root"] / "out_overlap"
    args = [str(slide), "--model", str(workspace["model"]), "--out", str(out)]
    code, output = infer([*args, "--overlap", "0.5"])
    assert code == 0, output
    d = out / "case0"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["inference"]["overlap"] == 0.5 and summary["inference"]["tiles_per_cell"] == 4
    geom = json.loads((d / "score_grid.json").read_text())
    grid = np.load(d / "score_grid.npy")
    rows = list(csv.DictReader((d / "scores.csv").open()))
    assert geom["step_px"] == geom["tile_size_px"] / 2
    assert len(rows) == summary["tiles"] == len(json.loads((d / "tiles.geojson").read_text())
                                                ["features"])
    boxes = np.array([[float(r[k]) for k in ("x", "y", "w", "h")] for r in rows])
    probs = np.array([[float(r[m]) for m in MARKERS] for r in rows])
    step = geom["step_px"]
    scored = np.argwhere(np.isfinite(grid[..., 0]))
    assert len(scored) > len(rows)  # cells at the stride: finer than the tiles
    for r, c in scored[:: max(1, len(scored) // 25)]:
        cx, cy = (c + 0.5) * step, (r + 0.5) * step
        cover = ((boxes[:, 0] <= cx) & (cx < boxes[:, 0] + boxes[:, 2])
                 & (boxes[:, 1] <= cy) & (cy < boxes[:, 1] + boxes[:, 3]))
        np.testing.assert_allclose(grid[r, c], probs[cover].mean(0), atol=1e-5)

    code, output = infer([*args, "--overlap", "0.5"])
    assert code == 0 and "1 skipped" in output
    code, output = infer(args)  # no overlap: a different grid, so the slide is redone
    assert code == 0 and "1 done" in output, output
    plain = json.loads((d / "summary.json").read_text())
    assert plain["inference"]["overlap"] == 0.0 and plain["tiles"] < len(rows) / 3
    code, output = infer([*args, "--overlap", "1.5"])
    assert code == 1 and "--overlap" in output


def test_summary_areas_follow_the_blended_cells() -> None:
    # three half-overlapping tiles in a row; only the middle one is positive. Per tile, a third of
    # the tissue is above 0.5; on the blended heatmap no cell is (each cell it covers is the
    # mean of it and a negative neighbour, 0.45), so the summary must say 0.
    from histocsc.predict.outputs import summarise

    tiles = lattice([(0, 0), (0, 1), (0, 2)], step=50, size=100)
    probs = np.array([[0.0], [0.9], [0.0]], np.float32)
    grid = blend_grid(tiles, probs)
    tissue = blend_grid(tiles, tiles.tissue_fraction[:, None].astype(np.float32))[..., 0]
    by_cell = summarise(tiles, probs, ["M"], {"M": 0.5}, grid, tissue)["markers"]["M"]
    assert float((probs[:, 0] >= 0.5).mean()) == pytest.approx(1 / 3)  # what tiles would say
    assert by_cell["area_fraction_above_threshold"] == 0.0
    assert by_cell["tiles_above_threshold"] == 1
    # a cell covered by two positive tiles counts, weighted by its share of the covered cells
    probs = np.array([[0.0], [0.9], [0.9]], np.float32)
    grid = blend_grid(tiles, probs)
    cells = summarise(tiles, probs, ["M"], {"M": 0.5}, grid, tissue)["markers"]["M"]
    covered = np.isfinite(grid[..., 0])
    expected = float((grid[..., 0][covered] >= 0.5).sum()) / covered.sum()
    assert cells["area_fraction_above_threshold"] == pytest.approx(expected) and expected > 0
