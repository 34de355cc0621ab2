"""The slide factory: one backend per kind of file, the choice logged, fallbacks explained."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from histocsc.errors import SlideError, SlideNotFoundError
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array
from histocsc.wsi.reader import TileReader
from histocsc.wsi.slide import background_color, composite, open_slide

CMU = "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def tiff(tmp_path_factory):
    rng = np.random.default_rng(3)
    image = rng.integers(40, 230, (900, 1100, 3), dtype=np.uint8)
    return write_pyramid_tiff_from_array(
        tmp_path_factory.mktemp("backends") / "s.tiff", image, 0.5, min_size=256
    )


def test_factory_picks_one_backend_per_kind_and_logs_it(real_data, tmp_path, caplog):
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(png)
    caplog.set_level(logging.INFO, logger="histocsc.wsi.slide")
    svs = real_data / "svs" / CMU
    with open_slide(svs, fast_tiles=True) as fast, open_slide(svs) as plain:
        assert (fast.backend, plain.backend) == ("tiff", "openslide")
        assert np.array_equal(fast.read(0, 0, 500, 400, mpp=1.0), plain.read(0, 0, 500, 400, 1.0))
    with open_slide(png, mpp=0.5) as image:
        assert image.backend == "image" and image.dimensions == (80, 64)
    text = caplog.text
    assert "direct TIFF tile backend" in text and "OpenSlide backend (aperio)" in text
    assert "image backend" in text


def test_fast_path_probes_beyond_the_first_tile(tiff, tmp_path, caplog):
    """A damaged last tile: the direct decoder is refused at open (the reason logged) and the
    slide is read by OpenSlide, instead of failing or differing mid-run."""
    damaged = tmp_path / "damaged.tiff"
    damaged.write_bytes(tiff.read_bytes())
    with tifffile.TiffFile(damaged) as tif:
        page = tif.pages[0]
        last = max(i for i, n in enumerate(page.databytecounts) if n > 0)
        offset = page.dataoffsets[last]
    with damaged.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(64))
    caplog.set_level(logging.INFO, logger="histocsc.wsi.slide")
    with open_slide(tiff, fast_tiles=True) as good:
        assert good.backend == "tiff"
    with open_slide(damaged, fast_tiles=True) as slide:
        assert slide.backend == "openslide"
        slide.read(0, 0, 256, 256)  # the undamaged tiles still read
    assert f"{damaged}: OpenSlide backend; direct TIFF tiles unusable" in caplog.text


def test_reader_threads_share_one_decoded_image(tmp_path):
    """Every handle on the same plain image uses one read-only decoded copy; reads are copies."""
    path = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(path)
    a, b = TileReader(path, 0.5), TileReader(path, 0.5)
    assert a.slide.image is b.slide.image and not a.slide.image.flags.writeable
    region = a.slide.read(0, 0, 50, 40)
    region[:] = 0  # a read is the caller's own array
    assert a.slide.image[:40, :50].any()
    tiles = next(b.read_runs(np.array([[0, 0, 64, 64]]), 64))[1]
    assert np.array_equal(tiles[0], b.slide.image[:64, :64])
    a.close()
    b.close()
    gc.collect()
    with open_slide(path, mpp=0.5) as again:  # freed with the last handle, decoded anew
        assert again.image is not None


def test_background_color_is_honoured():
    assert background_color({"openslide.background-color": "F0E0D0"}) == (240, 224, 208)
    assert background_color({"openslide.background-color": "nonsense"}) == (255, 255, 255)
    assert background_color({}) == (255, 255, 255)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)
    out = composite(rgba, (240, 224, 208))
    assert out[0, 0].tolist() == [240, 224, 208] and out[0, 1].tolist() == [10, 20, 30]


def test_missing_slide_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        open_slide(tmp_path / "absent.svs")
    assert isinstance(info.value, SlideNotFoundError) and isinstance(info.value, SlideError)
    assert str(info.value) == f"{tmp_path / 'absent.svs'}: file not found"
