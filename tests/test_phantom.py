"""Phantom slide pairs: slides open, truth matches the pixels, output is deterministic."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from skimage.color import hdx_from_rgb, separate_stains
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import ConfigError, DataError
from histocsc.synthetic.generate import make_case, make_cohort, splits
from histocsc.synthetic.transform import random_transform
from histocsc.synthetic.truth import (
    he_to_ihc,
    ihc_to_he,
    landmarks,
    load_mask,
    load_truth,
    truth_labels,
)

SIZE = 2048
MARKERS = ("CD133", "CD44")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    make_cohort(out, cases=2, size_px=SIZE, mpp=0.5, markers=MARKERS, seed=7)
    return out


def _read(path: str | Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def _od(rgb: np.ndarray) -> np.ndarray:
    """Total optical density per pixel, smoothed over ~8 px."""
    od = -np.log(np.clip(rgb.astype(np.float32), 1, 255) / 255.0).sum(2)
    return cv2.blur(od, (9, 9))


def _tissue(rgb: np.ndarray) -> np.ndarray:
    return cv2.blur(_od(rgb), (15, 15)) > 0.35


def test_cohort_csv_lists_every_slide_with_splits(cohort: Path) -> None:
    rows = list(csv.DictReader((cohort / "cohort.csv").open()))
    assert [r["case"] for r in rows] == ["case000", "case001"]
    assert list(rows[0]) == ["case", "he", "CD133", "CD44", "split"]
    assert [r["split"] for r in rows] == ["train", "test"]
    for row in rows:
        for col in ("he", *MARKERS):
            assert (cohort / row[col]).is_file()


def test_splits_are_sensible() -> None:
    assert splits(5) == ["train"] * 3 + ["val", "test"]
    assert splits(1) == ["train"]
    assert splits(10).count("test") == 2 and splits(10).count("val") == 1


def test_openslide_opens_every_slide_with_size_levels_and_mpp(cohort: Path) -> None:
    truth = load_truth(cohort / "case000")
    paths = [truth["he"]["path"]] + [truth["markers"][m]["ihc"]["path"] for m in MARKERS]
    for path in paths:
        with openslide.OpenSlide(path) as s:
            assert s.dimensions == (SIZE, SIZE)
            assert s.level_count >= 2
            assert s.level_dimensions[1] == (SIZE // 4, SIZE // 4)
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-3)


def test_truth_json_has_transform_landmarks_and_masks(cohort: Path) -> None:
    truth = load_truth(cohort / "case001")
    assert truth["he"]["mpp"] == 0.5
    for m in MARKERS:
        lm = landmarks(truth, m)
        assert lm.shape[0] >= 50
        np.testing.assert_allclose(he_to_ihc(truth, m, lm[:, :2]), lm[:, 2:], atol=1e-2)
        np.testing.assert_allclose(ihc_to_he(truth, m, lm[:, 2:]), lm[:, :2], atol=1e-2)
        mask = load_mask(truth, m)
        assert mask.shape == (SIZE // truth["mask_downsample"],) * 2
        assert 0 < mask.mean() < 0.6
    # CD44 is broader than CD133 where both are expressed, so it covers more.
    assert load_mask(truth, "CD44").sum() > load_mask(truth, "CD133").sum()


def test_landmarks_land_on_the_same_tissue_feature(cohort: Path) -> None:
    truth = load_truth(cohort / "case000")
    he = _read(truth["he"]["path"])
    he_od = _od(he)
    for m in MARKERS:
        ihc_od = _od(_read(truth["markers"][m]["ihc"]["path"]))
        lm = landmarks(truth, m)
        kinds = truth["markers"][m]["landmark_features"]
        xi = np.clip(lm[:, 2].round().astype(int), 0, SIZE - 1)
        yi = np.clip(lm[:, 3].round().astype(int), 0, SIZE - 1)
        xh = np.clip(lm[:, 0].round().astype(int), 0, SIZE - 1)
        yh = np.clip(lm[:, 1].round().astype(int), 0, SIZE - 1)
        for k, kind in enumerate(kinds):
            if kind == "lumen":  # an empty lumen on both sections
                assert he_od[yh[k], xh[k]] < 0.35 and ihc_od[yi[k], xi[k]] < 0.35
            else:  # stained tissue on both
                assert he_od[yh[k], xh[k]] > 0.35 and ihc_od[yi[k], xi[k]] > 0.2
        # The same points under a wrong transform (identity) often miss the tissue or lumen.
        ihc_t = _tissue(_read(truth["markers"][m]["ihc"]["path"]))
        tissue_pts = [k for k, kind in enumerate(kinds) if kind != "lumen"]
        hits = ihc_t[yi[tissue_pts], xi[tissue_pts]].mean()
        naive = ihc_t[yh[tissue_pts], xh[tissue_pts]].mean()
        assert hits > 0.95 and hits > naive


def test_tissue_outline_maps_through_the_transform(cohort: Path) -> None:
    truth = load_truth(cohort / "case001")
    tissue = load_mask(truth, "tissue")
    ds = truth["mask_downsample"]
    ys, xs = np.mgrid[0:SIZE:8, 0:SIZE:8]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(float) + 0.5

    def truth_at(he_pts: np.ndarray) -> np.ndarray:
        idx = (he_pts // ds).astype(int)
        ok = (idx >= 0).all(1) & (idx < tissue.shape[0]).all(1)
        out = np.zeros(len(idx), bool)
        out[ok] = tissue[idx[ok, 1], idx[ok, 0]]
        return out

    for m in MARKERS:
        seen = _tissue(_read(truth["markers"][m]["ihc"]["path"]))[ys.ravel(), xs.ravel()]
        mapped = truth_at(ihc_to_he(truth, m, pts))
        unmapped = truth_at(pts)
        iou = (mapped & seen).sum() / (mapped | seen).sum()
        naive = (unmapped & seen).sum() / (unmapped | seen).sum()
        assert iou > 0.85, iou
        assert iou > naive + 0.1, (iou, naive)


def test_dab_is_higher_inside_the_marker_mask(cohort: Path) -> None:
    for case in ("case000", "case001"):
        truth = load_truth(cohort / case)
        ds = truth["mask_downsample"]
        for m in MARKERS:
            rgb = _read(truth["markers"][m]["ihc"]["path"])[::8, ::8]
            dab = separate_stains(rgb, hdx_from_rgb)[..., 1]
            ys, xs = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
            pts = np.stack([xs.ravel(), ys.ravel()], 1) * 8.0 + 0.5
            he = ihc_to_he(truth, m, pts)
            mask = load_mask(truth, m)
            ix = np.clip((he[:, 0] // ds).astype(int), 0, mask.shape[1] - 1)
            iy = np.clip((he[:, 1] // ds).astype(int), 0, mask.shape[0] - 1)
            inside = mask[iy, ix].reshape(rgb.shape[:2])
            tissue = _tissue(rgb)
            pos = dab[inside & tissue].mean()
            neg = dab[~inside & tissue].mean()
            assert pos > 2.0 * neg, (case, m, pos, neg)


def test_truth_labels_are_area_fractions(cohort: Path) -> None:
    truth = load_truth(cohort / "case000")
    mask = load_mask(truth, "CD44")
    ds = truth["mask_downsample"]
    iy, ix = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    boxes = np.array([[ix * ds, iy * ds, ds, ds], [0, 0, ds, ds], [0, 0, SIZE, SIZE]])
    frac = truth_labels(truth, "CD44", boxes)
    assert frac[0] == pytest.approx(1.0)
    assert frac[1] == pytest.approx(0.0)
    assert frac[2] == pytest.approx(mask.mean())
    cols = {"x": boxes[:, 0], "y": boxes[:, 1], "w": boxes[:, 2], "h": boxes[:, 3]}
    np.testing.assert_allclose(truth_labels(truth, "CD44", cols), frac)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_different_case(tmp_path: Path) -> None:
    a = make_case(tmp_path / "a", "c", seed=11, size_px=1024)
    b = make_case(tmp_path / "b", "c", seed=11, size_px=1024)
    c = make_case(tmp_path / "c", "c", seed=12, size_px=1024)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert all(da[k] != dc[k] for k in da)


def test_inverse_transform_is_accurate() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        tf = random_transform(rng, (4000, 4000), (4000, 4000), 0.25)
        assert abs(tf.rotation_deg) <= 30 and 0.95 <= tf.scale <= 1.05
        pts = rng.uniform(0, 8000, (100, 2))
        np.testing.assert_allclose(tf.inverse(tf.forward(pts)), pts, atol=1e-4)
        u, v = tf.inverse_maps(100, 200, 64, 48)
        centres = np.stack(np.meshgrid(np.arange(100, 164) + 0.5, np.arange(200, 248) + 0.5), -1)
        exact = tf.inverse(centres.reshape(-1, 2)).reshape(48, 64, 2)
        np.testing.assert_allclose(np.stack([u, v], -1), exact, atol=0.02)


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="markers"):
        make_case(tmp_path, "c", 0, size_px=1024, markers=("CD44", "CD44"))
    with pytest.raises(DataError, match="truth"):
        load_truth(tmp_path / "nowhere")
    result = CliRunner().invoke(app, ["phantom", str(tmp_path / "x"), "--size-px", "100"])
    assert result.exit_code == 1
    assert "error: phantom: --size-px" in result.output


def test_cli_writes_a_cohort(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["phantom", str(tmp_path), "--cases", "1", "--size-px", "768", "--markers", "CD44"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cohort.csv").read_text().splitlines()[0] == "case,he,CD44,split"
    truth = load_truth(tmp_path / "case000")
    assert list(truth["markers"]) == ["CD44"]


def test_truth_paths_are_absolute_from_a_relative_case_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histocsc.synthetic.generate import make_case
    from histocsc.synthetic.truth import load_mask, load_truth

    make_case(tmp_path, "rel", 3, size_px=1024, mpp=1.0)
    monkeypatch.chdir(tmp_path)
    truth = load_truth(Path("rel"))
    assert Path(truth["he"]["path"]).is_absolute() and Path(truth["he"]["path"]).is_file()
    assert load_mask(truth, "CD133").ndim == 2


def test_every_marker_appears_alone_in_a_case() -> None:
    """The second stem-like region is CD44 only, the third CD133 only: a cohort where CD133 only
    ever sits beside CD44 cannot teach an H&E model the CD133 signature on its own."""
    from histocsc.synthetic.layout import make_layout

    for seed in (11, 12, 13):
        layout = make_layout(np.random.default_rng(seed), 3072, 3072, 1.0, markers=MARKERS)
        flags = [tuple(r.markers) for r in layout.stem_regions]
        assert len(flags) >= 3, f"seed {seed}: too few regions to check"
        assert flags[0] == MARKERS and flags[1] == ("CD44",) and flags[2] == ("CD133",)
