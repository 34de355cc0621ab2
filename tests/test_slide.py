"""open_slide on the real SVS files, plain images as one-level slides, and bad input."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from histocsc.errors import SlideError
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array
from histocsc.wsi.slide import open_slide

CMU = "cmu-1-small-region.svs"  # 2220 x 2967, one level, mpp 0.499
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # 4443 x 3567 + 2221 x 1783, no mpp in the file


@pytest.fixture(scope="module")
def svs(real_data):
    return real_data / "svs"


def test_aperio_slide_metadata(svs):
    with open_slide(svs / CMU) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20
        assert slide.vendor == "aperio"


def test_slide_without_mpp_needs_one(svs):
    with open_slide(svs / TCGA) as slide:
        assert slide.level_count == 2 and slide.dimensions == (4443, 3567)
        with pytest.raises(SlideError, match="pixel size") as err:
            _ = slide.mpp
        assert str(svs / TCGA) in str(err.value)
        with pytest.raises(SlideError, match="pixel size"):
            slide.read(0, 0, 256, 256, mpp=1.0)
    with open_slide(svs / TCGA, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.read(0, 0, 800, 600, mpp=1.0).shape == (150, 200, 3)


@pytest.mark.parametrize(
    "mpp, shape",
    [
        (None, (1000, 1200, 3)),
        (0.499, (1000, 1200, 3)),
        (1.0, (499, 599, 3)),
        (2.0, (250, 299, 3)),
        (8.0, (62, 75, 3)),
    ],
)
def test_read_sizes_at_several_mpp(svs, mpp, shape):
    with open_slide(svs / CMU) as slide:
        region = slide.read(600, 1200, 1200, 1000, mpp=mpp)
    assert region.shape == shape and region.dtype == np.uint8


def test_read_pixels_are_consistent_across_resolutions(svs):
    with open_slide(svs / CMU) as slide:
        full = slide.read(600, 1200, 1200, 1000)
        coarse = slide.read(600, 1200, 1200, 1000, mpp=2.0)
        sized = slide.read(600, 1200, 1200, 1000, out_size=(300, 250))
    assert full.mean() < 220  # tissue, not glass
    expected = cv2.resize(full, coarse.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(expected.astype(int) - coarse).mean() < 2
    assert sized.shape == (250, 300, 3)


def test_pyramid_level_is_used_and_matches_level0(svs):
    with open_slide(svs / TCGA, mpp=0.25) as slide:
        fine = slide.read(1000, 1000, 1600, 1200)
        coarse = slide.read(1000, 1000, 1600, 1200, mpp=0.5)  # level 1 (downsample 2)
    assert coarse.shape == (600, 800, 3)
    expected = cv2.resize(fine, (800, 600), interpolation=cv2.INTER_AREA)
    assert np.abs(expected.astype(int) - coarse).mean() < 8  # JPEG 2000 levels differ a little


def test_thumbnail(svs):
    with open_slide(svs / CMU) as slide:
        thumb = slide.thumbnail(4.0)
    assert thumb.shape == (round(2967 * 0.499 / 4), round(2220 * 0.499 / 4), 3)


def test_region_outside_the_slide(svs):
    with open_slide(svs / CMU) as slide:
        for box in [(2000, 0, 500, 100), (-1, 0, 10, 10), (0, 2900, 100, 100), (0, 0, 0, 10)]:
            with pytest.raises(SlideError, match="outside the slide") as err:
                slide.read(*box)
            assert CMU in str(err.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_plain_image_is_a_single_level_slide(svs, tmp_path, suffix):
    with open_slide(svs / CMU) as slide:
        rgb = slide.read(0, 1000, 640, 480)
    path = tmp_path / f"crop{suffix}"
    Image.fromarray(rgb).save(path, quality=95)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.dimensions == (640, 480) and slide.level_count == 1
        assert slide.mpp == 0.5
        assert slide.read(0, 0, 640, 480, mpp=1.0).shape == (240, 320, 3)
        back = slide.read(0, 0, 640, 480)
    assert np.abs(back.astype(int) - rgb).mean() < 3


def test_png_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png", mpp=1.0) as slide:
        rgb = slide.read(0, 0, 32, 32)
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[31, 31]) == (255, 255, 255)


def test_pyramid_tiff_records_mpp(svs, tmp_path):
    with open_slide(svs / CMU) as slide:
        rgb = slide.read(0, 0, 1024, 1024)
    path = write_pyramid_tiff_from_array(tmp_path / "p.tiff", rgb, 0.5, min_size=256)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count >= 2
        assert slide.read(0, 0, 1024, 1024, mpp=2.0).shape == (256, 256, 3)


def _bad_files(tmp_path, svs):
    with open_slide(svs / CMU) as slide:
        rgb = slide.read(0, 0, 1024, 1024)
    good = write_pyramid_tiff_from_array(tmp_path / "good.tiff", rgb, 0.5).read_bytes()
    files = {
        "missing": (tmp_path / "missing.svs", None),
        "empty": (tmp_path / "empty.svs", b""),
        "text": (tmp_path / "notes.svs", b"this is not a slide\n" * 50),
        "truncated-head": (tmp_path / "trunc-a.tiff", good[: len(good) // 2]),
        "truncated-tail": (tmp_path / "trunc-b.tiff", good[: len(good) * 9 // 10]),
        "dicom": (tmp_path / "slide.dcm", b"\0" * 128 + b"DICM" + os.urandom(4000)),
        "corrupt-svs": (tmp_path / "corrupt.svs", b"II*\0" + os.urandom(8000)),
    }
    for path, data in files.values():
        if data is not None:
            path.write_bytes(data)
    return files


@pytest.mark.parametrize(
    "kind",
    ["missing", "empty", "text", "truncated-head", "truncated-tail", "dicom", "corrupt-svs"],
)
def test_bad_input_is_a_slide_error_naming_the_file(svs, tmp_path, kind):
    path, _ = _bad_files(tmp_path, svs)[kind]
    with pytest.raises(SlideError) as err:
        with open_slide(path) as slide:
            slide.read(0, 0, 64, 64)
    assert str(path) in str(err.value)


def test_folder_and_bad_mpp(tmp_path, svs):
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)
    with pytest.raises(SlideError, match="mpp"):
        open_slide(svs / CMU, mpp=-1)


def test_large_reads_are_split_into_blocks(svs, monkeypatch):
    """Reads bigger than CHUNK_PX at the level read are assembled from blocks (this once
    recursed forever when the output was large but its downsample small)."""
    import histocsc.wsi.slide as slide_module

    monkeypatch.setattr(slide_module, "CHUNK_PX", 256)
    with open_slide(svs / CMU) as slide:
        blocks = slide.read(0, 0, 2048, 1536, mpp=slide.mpp * 2)
        thumb = slide.thumbnail(1.0)
    monkeypatch.setattr(slide_module, "CHUNK_PX", 100_000)
    with open_slide(svs / CMU) as slide:
        whole = slide.read(0, 0, 2048, 1536, mpp=slide.mpp * 2)
        assert thumb.shape == slide.thumbnail(1.0).shape
    assert blocks.shape == whole.shape == (768, 1024, 3)
    assert np.abs(blocks.astype(int) - whole).mean() < 1
