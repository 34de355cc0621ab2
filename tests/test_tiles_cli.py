"""The `histocsc tiles` command end to end on small pyramid TIFFs made of real H&E pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.wsi.grid import TileGrid
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array
from histocsc.wsi.reader import TileReader
from histocsc.wsi.slide import open_slide

runner = CliRunner()


@pytest.fixture(scope="module")
def slides(real_data, tmp_path_factory):
    """A folder with one 2000 x 1600 px slide at 0.5 µm/px: real tissue pasted on glass."""
    with open_slide(real_data / "svs" / "cmu-1-small-region.svs") as svs:
        tissue = svs.read(600, 1200, 1200, 1000)
    canvas = np.full((1600, 2000, 3), 242, np.uint8)
    canvas[300:1300, 400:1600] = tissue
    folder = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff_from_array(folder / "case1.tiff", canvas, 0.5, min_size=256)
    tifffile.imwrite(folder / "case2.tif", canvas[:800, :1000])  # plain TIFF, no pixel size
    Image.fromarray(canvas[:64, :64]).save(folder / "overview.png")  # not taken from a folder
    return folder


def _run(*args: str):
    return runner.invoke(app, ["tiles", *map(str, args)])


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_tiles_writes_outputs_and_skips_on_rerun(slides, tmp_path):
    slide = slides / "case1.tiff"
    result = _run(slide, "--out", tmp_path, "--save-images", "--workers", "2")
    assert result.exit_code == 0, result.output
    out = tmp_path / "case1"
    for name in ("grid.csv", "grid.json", "mask.png", "thumbnail.png", "tiles.npy"):
        assert (out / name).is_file(), name
    assert _no_temp_files(tmp_path)
    grid = TileGrid.load(out)
    tiles = np.load(out / "tiles.npy", mmap_mode="r")
    assert len(grid) > 8 and tiles.shape == (len(grid), 224, 224, 3) and tiles.dtype == np.uint8
    with open_slide(slide) as s:  # tiles are the slide's pixels, in grid order
        for k in (0, len(grid) // 2, len(grid) - 1):
            x, y, w, h = grid.boxes[k]
            assert np.array_equal(tiles[k], s.read(x, y, w, h))
    with Image.open(out / "mask.png") as mask:
        assert mask.mode == "L" and 0 < np.asarray(mask).mean() < 255
    meta = json.loads((out / "grid.json").read_text())
    assert meta["params"]["tile_px"] == 224 and meta["n_tiles"] == len(grid)

    stamp = (out / "tiles.npy").stat().st_mtime_ns
    again = _run(slide, "--out", tmp_path, "--save-images")
    assert again.exit_code == 0 and "skipped" in again.output
    assert (out / "tiles.npy").stat().st_mtime_ns == stamp

    other = _run(slide, "--out", tmp_path, "--tile-px", "112", "--mpp", "1.0", "--save-images")
    assert other.exit_code == 0 and "skipped" not in other.output
    grid = TileGrid.load(out)
    tiles = np.load(out / "tiles.npy", mmap_mode="r")
    assert tiles.shape == (len(grid), 112, 112, 3) and (grid.boxes[:, 2] == 224).all()
    with open_slide(slide) as s:
        x, y, w, h = grid.boxes[0]
        expected = s.read(x, y, w, h, mpp=1.0).astype(int)
    assert np.abs(tiles[0] - expected).mean() < 2


def test_grid_only_without_save_images(slides, tmp_path):
    result = _run(slides / "case1.tiff", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "case1" / "grid.json").is_file()
    assert not (tmp_path / "case1" / "tiles.npy").exists()


def test_missing_slide_is_one_line_error(tmp_path):
    result = _run(tmp_path / "nope.svs", "--out", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'nope.svs'}: file not found"]
    assert "Traceback" not in result.output


def test_folder_with_a_slide_lacking_mpp(slides, tmp_path):
    result = _run(slides, "--out", tmp_path, "--save-images")
    assert result.exit_code == 1
    assert "case2.tif" in result.output and "--slide-mpp" in result.output
    assert "overview.png:" not in result.output  # not tiled, and said so
    assert "left out 1 plain image file(s)" in result.output
    assert (tmp_path / "case1" / "grid.json").is_file()  # the good slide is still done
    assert not (tmp_path / "case2" / "grid.json").exists()
    fixed = _run(slides, "--out", tmp_path, "--slide-mpp", "0.5", "--save-images")
    assert fixed.exit_code == 0, fixed.output
    assert "case1.tiff: skipped" in fixed.output
    assert json.loads((tmp_path / "case2" / "grid.json").read_text())["slide_mpp"] == 0.5
    grid = TileGrid.load(tmp_path / "case2")  # a plain image, read through Slide.read
    tiles = np.load(tmp_path / "case2" / "tiles.npy")
    with open_slide(slides / "case2.tif", mpp=0.5) as s:
        x, y, w, h = grid.boxes[-1]
        assert len(grid) > 0 and np.array_equal(tiles[-1], s.read(x, y, w, h))


def test_corrupt_slide_and_bad_config(slides, tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\0" + bytes(5000))
    result = _run(bad, "--out", tmp_path / "out")
    assert result.exit_code == 1 and str(bad) in result.output
    assert "Traceback" not in result.output
    config = tmp_path / "tiles.yaml"
    config.write_text("tile_px: 224\nmin_tisue_fraction: 0.3\n")
    result = _run(slides / "case1.tiff", "--out", tmp_path / "out", "--config", config)
    assert result.exit_code == 1 and "min_tisue_fraction" in result.output


def test_stale_temporary_store_is_removed(slides, tmp_path):
    out = tmp_path / "case1"
    out.mkdir()
    (out / ".tiles.deadbeef.tmp.npy").write_bytes(b"half written")
    result = _run(slides / "case1.tiff", "--out", tmp_path, "--save-images")
    assert result.exit_code == 0, result.output
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_fast_reader_gives_openslide_pixels(real_data, name):
    """The direct TIFF tile decoder (JPEG, JPEG 2000) returns exactly OpenSlide's pixels."""
    path = real_data / "svs" / name
    reader = TileReader(path, 0.5)
    assert reader.slide.backend == "tiff"
    boxes = np.array([[x, y, 224, 224] for y in (0, 700, 1300) for x in (0, 224, 448, 1000)])
    got = np.concatenate([tiles.copy() for _, tiles in reader.read_runs(boxes, 224)])
    with open_slide(path, mpp=0.5) as slide:
        for k, (x, y, w, h) in enumerate(boxes):
            assert np.array_equal(got[k], slide.read(x, y, w, h)), (name, k)


def test_failure_mid_slide_leaves_no_half_written_output(slides, tmp_path):
    """A level-0 tile that cannot be decoded fails the slide after its grid was made: no
    tiles.npy, no grid.json and no temporary file remain, and the error names the file."""
    slide = tmp_path / "damaged.tiff"
    slide.write_bytes((slides / "case1.tiff").read_bytes())
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        cols = -(-page.shape[1] // page.tilewidth)
        index = (800 // page.tilelength) * cols + 1000 // page.tilewidth  # inside the tissue
        offset = page.dataoffsets[index]
    with slide.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(64))  # wipe the JPEG header of that tile
    out = tmp_path / "out"
    result = _run(slide, "--out", out, "--save-images", "--workers", "2")
    assert result.exit_code == 1 and str(slide) in result.output
    assert "Traceback" not in result.output
    assert not (out / "damaged" / "tiles.npy").exists()
    assert not (out / "damaged" / "grid.json").exists()
    assert _no_temp_files(out)


def test_openslide_path_gives_the_same_pixels(slides):
    """The OpenSlide read path (used for formats other than SVS / generic TIFF) gives the same
    pixels as the direct TIFF decoder, for runs of tiles and for a lone tile."""
    path = slides / "case1.tiff"
    fast = TileReader(path, None)
    slow = TileReader(path, None, fast_tiles=False)
    assert (fast.slide.backend, slow.slide.backend) == ("tiff", "openslide")
    boxes = np.array([[x, 448, 224, 224] for x in (0, 224, 448, 896)] + [[100, 900, 224, 224]])
    a = np.concatenate([t.copy() for _, t in fast.read_runs(boxes, 224)])
    b = np.concatenate([t.copy() for _, t in slow.read_runs(boxes, 224)])
    assert np.array_equal(a, b)


def test_slide_without_tissue_gives_an_empty_grid(tmp_path):
    glass = np.full((1200, 1500, 3), 241, np.uint8)
    glass[500:520, 300:1300] = 40  # a black pen line, not tissue
    slide = write_pyramid_tiff_from_array(tmp_path / "glass.tiff", glass, 0.5, min_size=256)
    result = _run(slide, "--out", tmp_path / "out", "--save-images")
    assert result.exit_code == 0 and "0 tiles" in result.output, result.output
    assert np.load(tmp_path / "out" / "glass" / "tiles.npy").shape == (0, 224, 224, 3)
    assert "skipped" in _run(slide, "--out", tmp_path / "out", "--save-images").output
