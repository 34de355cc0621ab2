"""Tissue detection judged on labelled real H&E tiles and on synthetic edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histocsc.config import load_config
from histocsc.errors import ConfigError
from histocsc.wsi.tissue import (
    TissueConfig,
    ink_mask,
    is_tissue_tile,
    tile_tissue_fraction,
    tissue_mask,
)

TILE_MPP = 0.5  # the labelled tiles are treated as 0.5 µm/px
MIN_FRACTION = 0.5  # the default min_tissue_fraction of the tile grid


def _tiles(real_data, pattern: str) -> list:
    paths = sorted((real_data / "he-tiles").glob(pattern))
    assert paths, f"no tiles match {pattern}"
    return paths


def _rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_every_tissue_tile_is_kept(real_data):
    for path in _tiles(real_data, "tissue-*.png"):
        frac = tile_tissue_fraction(_rgb(path), TILE_MPP)
        assert is_tissue_tile(_rgb(path), TILE_MPP, MIN_FRACTION), f"{path.name}: {frac:.2f}"


@pytest.mark.parametrize("pattern", ["no-tissue*.png", "almost-white-1.png"])
def test_background_and_ink_tiles_are_rejected(real_data, pattern):
    for path in _tiles(real_data, pattern):
        frac = tile_tissue_fraction(_rgb(path), TILE_MPP)
        assert not is_tissue_tile(_rgb(path), TILE_MPP, MIN_FRACTION), f"{path.name}: {frac:.2f}"


def test_pen_tiles_are_flagged_as_ink(real_data):
    for name in ("no-tissue-green-pen.png", "no-tissue-red-pen.png"):
        assert ink_mask(_rgb(real_data / "he-tiles" / name), ["red", "green"]).mean() > 0.4


def test_ink_rejection_can_be_switched_off(real_data):
    rgb = _rgb(real_data / "he-tiles" / "no-tissue-green-pen.png")
    assert tile_tissue_fraction(rgb, TILE_MPP, TissueConfig(ink=[])) > 0.5
    assert tile_tissue_fraction(rgb, TILE_MPP) == 0.0


def test_h_and_e_is_not_mistaken_for_ink(real_data):
    for path in _tiles(real_data, "tissue-*.png") + _tiles(real_data, "*nuclei-score-level0.png"):
        assert ink_mask(_rgb(path), ["red", "green", "blue", "black"]).mean() < 0.1, path.name


def test_mask_is_resolution_independent(real_data):
    rgb = _rgb(real_data / "he-tiles" / "tissue-level0-7352-11762-7864-12274.png")
    fine = tissue_mask(rgb, TILE_MPP).mean()
    coarse = tile_tissue_fraction(rgb, TILE_MPP, TissueConfig(mpp=2.0))
    assert abs(fine - coarse) < 0.05


def test_optical_density_method_agrees(real_data):
    cfg = TissueConfig(method="optical_density")
    for path in _tiles(real_data, "tissue-*.png"):
        assert is_tissue_tile(_rgb(path), TILE_MPP, MIN_FRACTION, cfg), path.name
    assert not is_tissue_tile(_rgb(real_data / "he-tiles" / "no-tissue.png"), 0.5, 0.5, cfg)


def test_small_objects_dropped_and_small_holes_filled():
    rgb = np.full((200, 200, 3), 245, np.uint8)
    rgb[20:180, 20:180] = (200, 120, 170)  # a pink tissue square 160 x 160 px
    rgb[90:94, 90:94] = 245  # a 4 x 4 px hole inside it
    rgb[5:8, 190:193] = (200, 120, 170)  # a 3 x 3 px speck of debris
    cfg = TissueConfig(min_object_um2=100, min_hole_um2=100, close_um=0, smooth_um=0)
    mask = tissue_mask(rgb, 1.0, cfg)
    assert mask[92, 92] and mask[100, 100]
    assert not mask[6, 191] and not mask[5, 5]
    no_cleanup = cfg.model_copy(update={"min_object_um2": 0, "min_hole_um2": 0})
    keep_all = tissue_mask(rgb, 1.0, no_cleanup)
    assert keep_all[6, 191] and not keep_all[92, 92]


def test_blank_and_uniform_images():
    assert not tissue_mask(np.full((64, 64, 3), 255, np.uint8), 4.0).any()
    assert tissue_mask(np.full((64, 64, 3), (190, 110, 160), np.uint8), 4.0).all()


def test_config_rejects_unknown_key_and_bad_range(tmp_path):
    path = tmp_path / "tissue.yaml"
    path.write_text("saturation_range: [0.3, 0.1]\n")
    with pytest.raises(ConfigError, match="saturation_range"):
        load_config(TissueConfig, path)
    path.write_text("sturation_range: [0.1, 0.3]\n")
    with pytest.raises(ConfigError, match="sturation_range"):
        load_config(TissueConfig, path)


@pytest.mark.parametrize(
    "ink", [(30, 80, 200), (60, 110, 210), (35, 35, 40), (70, 70, 70), (40, 170, 120)]
)
def test_blue_black_and_green_marker_is_not_tissue(ink):
    rgb = np.full((100, 100, 3), 240, np.uint8)
    rgb[20:80, 10:90] = ink  # a broad pen stroke on glass
    assert not tissue_mask(rgb, 4.0).any()
    rgb[20:80, 10:90] = (120, 60, 140)  # haematoxylin-rich tissue in the same place is kept
    assert tissue_mask(rgb, 4.0)[50, 50]


def test_dab_brown_is_not_red_ink():
    """IHC slides go through the same ink filter: DAB brown and haematoxylin are not ink."""
    from skimage import data

    ihc = data.immunohistochemistry()  # real colon IHC (DAB + haematoxylin), ships offline
    assert ink_mask(ihc, ["red", "green", "blue", "black"]).mean() < 0.02
    assert ink_mask(np.full((8, 8, 3), (150, 100, 60), np.uint8), ["red"]).sum() == 0
    assert ink_mask(np.full((8, 8, 3), (210, 40, 50), np.uint8), ["red"]).all()
