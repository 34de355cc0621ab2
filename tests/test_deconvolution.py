"""Optical density and colour deconvolution on real IHC and H&E images."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from histocsc.errors import ConfigError
from histocsc.ihc.deconvolution import (
    StainConfig,
    Stains,
    dab_od,
    dab_positive,
    deconvolve,
    hematoxylin_od,
    macenko_stains,
    named_stains,
    optical_density,
    stains_from_config,
    tissue_mask_od,
)


@pytest.fixture(scope="module")
def colon_ihc() -> np.ndarray:
    return skimage.data.immunohistochemistry()  # FHL2 in DAB + hematoxylin, real, offline


def test_optical_density_is_base10_and_white_is_zero() -> None:
    rgb = np.array([[[255, 255, 255], [25, 255, 2]]], np.uint8)
    od = optical_density(rgb)
    assert od[0, 0] == pytest.approx([0, 0, 0])
    assert od[0, 1, 0] == pytest.approx(np.log10(255 / 25), abs=1e-6)
    assert od[0, 1, 2] == pytest.approx(np.log10(255 / 2), abs=1e-6)
    assert optical_density(np.zeros((1, 1, 3), np.uint8)).max() == pytest.approx(np.log10(255))


def test_deconvolution_recovers_known_stain_amounts() -> None:
    stains = named_stains("H-DAB")
    amounts = np.array([0.4, 0.7, 0.0])  # hematoxylin, DAB, residual (OD)
    od = amounts @ stains.vectors
    rgb = np.round(255 * 10 ** (-od)).astype(np.uint8).reshape(1, 1, 3)
    out = deconvolve(rgb, stains)[0, 0]
    assert out[:2] == pytest.approx(amounts[:2], abs=0.02)
    assert dab_od(rgb)[0, 0] == pytest.approx(0.7, abs=0.02)
    assert hematoxylin_od(rgb)[0, 0] == pytest.approx(0.4, abs=0.02)


def test_dab_is_found_where_the_brown_is(colon_ihc: np.ndarray) -> None:
    rgb = colon_ihc.astype(int)
    r, b = rgb[..., 0], rgb[..., 2]
    brown = (r > b + 40) & (r < 200)  # by colour alone, independent of the stain model
    blue = (b > r + 20) & (b < 220)  # hematoxylin-only nuclei
    assert brown.sum() > 1000 and blue.sum() > 1000
    dab = dab_od(colon_ihc)
    assert np.median(dab[blue]) < 0.1 < 0.3 < np.median(dab[brown])
    positive = dab_positive(colon_ihc, 0.15)
    assert positive[brown].mean() > 0.9
    assert positive[blue].mean() < 0.1


def test_ihc_has_far_more_dab_than_its_he(real_data) -> None:
    folder = real_data / "registration"
    fractions = {}
    for name in ("Rat-Kidney_HE.jpg", "Rat-Kidney_PanCytokeratin.jpg"):
        rgb = np.asarray(Image.open(folder / name).convert("RGB"))
        tissue = tissue_mask_od(rgb, 0.15)
        fractions[name] = dab_positive(rgb, 0.15)[tissue].mean()
    ihc, he = fractions["Rat-Kidney_PanCytokeratin.jpg"], fractions["Rat-Kidney_HE.jpg"]
    assert ihc > 0.1
    assert ihc > 5 * he, fractions


def test_named_custom_and_estimated_matrices(colon_ihc: np.ndarray) -> None:
    he = named_stains("H&E")
    assert he.names == ("hematoxylin", "eosin", "residual")
    assert np.allclose(np.linalg.norm(he.vectors, axis=1), 1)
    custom = stains_from_config(
        StainConfig(
            name="custom",
            vectors=[[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]],
            names=["hematoxylin", "dab"],
        )
    )
    assert np.allclose(custom.vectors[:2], named_stains("H-DAB").vectors[:2], atol=0.01)
    estimated = macenko_stains(colon_ihc)
    reference = named_stains("H-DAB").vectors
    assert estimated.vectors[0] @ reference[0] > 0.9  # hematoxylin-like first
    assert estimated.vectors[1] @ reference[1] > 0.9  # DAB-like second
    with pytest.raises(ConfigError, match="singular"):
        Stains(np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), ("a", "b"))
    with pytest.raises(ConfigError, match="vectors"):
        stains_from_config(StainConfig(name="custom"))
    with pytest.raises(ConfigError):
        named_stains("Giemsa")
