"""Tile grid geometry, tissue filtering on a slide made of real H&E, and the saved format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histocsc import __version__
from histocsc.config import load_config
from histocsc.errors import ConfigError, DataError
from histocsc.io import file_checksum
from histocsc.wsi.grid import (
    TileGrid,
    TilesConfig,
    make_grid,
    mask_fractions,
    tile_geometry,
    tile_positions,
)
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array
from histocsc.wsi.slide import open_slide

TISSUE_BOX = (600, 400, 1200, 1000)  # where real tissue is pasted on glass, level-0 x, y, w, h


@pytest.fixture(scope="module")
def phantom_slide(real_data, tmp_path_factory):
    """2400 x 1800 px at 0.5 µm/px: glass with a 1200 x 1000 block of real H&E tissue."""
    with open_slide(real_data / "svs" / "cmu-1-small-region.svs") as svs:
        tissue = svs.read(600, 1200, 1200, 1000)
    canvas = np.full((1800, 2400, 3), 242, np.uint8)
    x, y, w, h = TISSUE_BOX
    canvas[y : y + h, x : x + w] = tissue
    path = tmp_path_factory.mktemp("grid") / "phantom.tiff"
    return write_pyramid_tiff_from_array(path, canvas, 0.5, min_size=256)


def test_geometry_in_level0_pixels():
    assert tile_geometry(0.25, 224, 0.5, 224) == (448, 448)
    assert tile_geometry(0.5, 224, 0.5, 112) == (224, 112)
    assert tile_geometry(0.499, 224, 0.5, 224) == (224, 224)


def test_only_whole_tiles_inside_the_slide():
    pos = tile_positions(1000, 500, 224, 224)
    assert sorted(set(pos[:, 0])) == [0, 224, 448, 672]  # 896 + 224 > 1000: margin not tiled
    assert sorted(set(pos[:, 1])) == [0, 224]
    assert list(pos[1]) == [224, 0]  # row by row
    assert len(tile_positions(100, 100, 224, 224)) == 0
    overlap = tile_positions(448, 224, 224, 112)
    assert list(overlap[:, 0]) == [0, 112, 224]


def test_stride_and_overlap_config(tmp_path):
    assert TilesConfig(overlap_px=24).stride == 200
    assert TilesConfig(stride_px=100, overlap_px=500).stride == 100
    with pytest.raises(ValueError, match="overlap_px"):
        TilesConfig(overlap_px=224)
    path = tmp_path / "tiles.yaml"
    path.write_text("tile_px: 256\ntissue:\n  min_object_um2: -1\n")
    with pytest.raises(ConfigError, match="tissue.min_object_um2"):
        load_config(TilesConfig, path)


def test_mask_fractions():
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True  # left half of a 2000 x 1000 slide
    boxes = np.array([[0, 0, 500, 500], [1500, 0, 500, 500], [750, 0, 500, 500]])
    assert list(mask_fractions(mask, boxes, 2000, 1000)) == pytest.approx([1, 0, 0.5])


def test_grid_covers_the_tissue_only(phantom_slide):
    cfg = TilesConfig(tile_px=224, mpp=0.5)
    with open_slide(phantom_slide) as slide:
        grid = make_grid(slide, cfg)
    assert 10 <= len(grid) <= 24  # the 1200 x 1000 block holds at most 6 x 5 whole-ish tiles
    x, y, w, h = TISSUE_BOX
    centres = grid.boxes[:, :2] + 112
    assert ((centres[:, 0] > x) & (centres[:, 0] < x + w)).all()
    assert ((centres[:, 1] > y) & (centres[:, 1] < y + h)).all()
    assert (grid.table["tissue_fraction"] >= 0.5).all()
    assert (grid.boxes[:, 2:] == 224).all()
    assert grid.slide_width == 2400 and grid.slide_height == 1800
    everything = TilesConfig(min_tissue_fraction=0.0)
    with open_slide(phantom_slide) as slide:
        assert len(make_grid(slide, everything)) == (2400 // 224) * (1800 // 224)


def test_grid_at_another_resolution(phantom_slide):
    with open_slide(phantom_slide) as slide:
        grid = make_grid(slide, TilesConfig(tile_px=128, mpp=1.0, overlap_px=64))
    assert (grid.boxes[:, 2] == 256).all()
    assert set(np.diff(np.unique(grid.table["x"]))) == {128}


def test_save_and_load_round_trip(phantom_slide, tmp_path):
    with open_slide(phantom_slide) as slide:
        grid = make_grid(slide, TilesConfig(), checksum=file_checksum(phantom_slide))
    grid.save(tmp_path)
    lines = (tmp_path / "grid.csv").read_text().splitlines()
    assert lines[0] == "x,y,w,h,tissue_fraction" and len(lines) == len(grid) + 1
    meta = json.loads((tmp_path / "grid.json").read_text())
    assert meta["slide_checksum"] == file_checksum(phantom_slide)
    assert meta["histocsc_version"] == __version__
    assert meta["slide_mpp"] == pytest.approx(0.5) and meta["n_tiles"] == len(grid)
    assert meta["params"]["tissue"]["method"] == "saturation"
    back = TileGrid.load(tmp_path)
    assert back.meta() == grid.meta()
    for col in ("x", "y", "w", "h"):
        assert np.array_equal(back.table[col], grid.table[col])
    assert np.allclose(back.table["tissue_fraction"], grid.table["tissue_fraction"], atol=1e-4)


def test_empty_grid_round_trip(tmp_path):
    empty = {c: np.zeros(0, np.int64) for c in ("x", "y", "w", "h")}
    empty["tissue_fraction"] = np.zeros(0, np.float32)
    grid = TileGrid("s.svs", 0.5, 100, 100, 0.5, 224, 224, {}, empty)
    grid.save(tmp_path)
    back = TileGrid.load(tmp_path)
    assert len(back) == 0 and back.boxes.shape == (0, 4)


def test_load_errors_name_the_file(phantom_slide, tmp_path):
    with pytest.raises(DataError, match="grid.json"):
        TileGrid.load(tmp_path)
    with open_slide(phantom_slide) as slide:
        make_grid(slide, TilesConfig()).save(tmp_path)
    csv = tmp_path / "grid.csv"
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match="rows"):
        TileGrid.load(tmp_path)
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="header"):
        TileGrid.load(tmp_path)
