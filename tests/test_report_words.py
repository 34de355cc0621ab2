"""What a slide's outputs say about themselves: the model's own markers (a stem-like map only when
the model defines one), where the pixel size came from, every warning of the run, cohort links
and the model's name; and which slides a folder or a link names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.errors import ModelError
from histocsc.learn.export import export_onnx
from histocsc.learn.metadata import decode_metadata, model_metadata
from histocsc.learn.model import build_model
from histocsc.predict.browser import Page, find_chromium
from histocsc.wsi.discover import find_slides
from histocsc.wsi.pyramid import write_pyramid_tiff_from_array

TILE, MPP, SLIDE_MPP = 48, 2.0, 1.0


def tissue_image(seed: int, width: int = 800, height: int = 600) -> np.ndarray:
    """Pink ellipses with purple dots on white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 244, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 2), (width // 3, height // 3), 20, 0, 360, 1, -1)
    img[mask > 0] = (220, 140, 185)
    ys, xs = np.nonzero(mask)
    for i in rng.choice(len(xs), 900, replace=False):
        cv2.circle(img, (int(xs[i]), int(ys[i])), int(rng.integers(2, 5)), (90, 50, 140), -1)
    return img


def make_model(path: Path, markers: list[str], stem_like: list[str] | None = None) -> Path:
    torch.manual_seed(0)
    meta = {"markers": markers, "tile_px": TILE, "mpp": MPP, "backbone": "tiny",
            "mean": [0.8, 0.6, 0.75], "std": [0.1, 0.15, 0.1],
            "thresholds": {m: 0.0 for m in markers}}  # every tile above: areas are the tissue
    if stem_like is not None:
        meta["stem_like_markers"] = stem_like
    export_onnx(build_model("tiny", len(markers)).eval(), meta, path)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("words")
    (root / "slides").mkdir()
    write_pyramid_tiff_from_array(root / "slides" / "case#1 50%.tif", tissue_image(1), SLIDE_MPP,
                                  tile=128)
    write_pyramid_tiff_from_array(root / "slides" / "plain.tif", tissue_image(2), SLIDE_MPP,
                                  tile=128)
    return root


def infer(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["infer", *args])
    return res.exit_code, res.output


def test_a_model_for_other_markers_gets_a_report_in_its_own_words(slides: Path) -> None:
    model = make_model(slides / "ihc.onnx", ["IHC"])
    out = slides / "out_ihc"
    code, output = infer(str(slides / "slides"), "--model", str(model), "--out", str(out))
    assert code == 0, output
    d = out / "plain"
    page = (d / "report.html").read_text(encoding="utf-8")
    assert "IHC-positive regions" in page
    assert "CD133" not in page and "stem-like map" not in page and 'value="stem_like"' not in page
    assert not (d / "heatmap_stem_like.png").exists()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["stem_like"] is None and summary["model"]["stem_like_markers"] == []
    assert "heatmap_stem_like.png" not in summary["outputs"]
    # the cohort table still has every slide, with no stem-like figure
    with (out / "cohort_summary.csv").open() as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["plain"]["stem_like_area_fraction"] == "" and rows["plain"]["status"] == "done"


def test_the_stem_like_map_joins_the_markers_recorded_at_export(slides: Path) -> None:
    model = make_model(slides / "mixed.onnx", ["CD133", "PanCK"], stem_like=["CD133"])
    out = slides / "out_mixed"
    code, output = infer(str(slides / "slides" / "plain.tif"), "--model", str(model),
                         "--out", str(out))
    assert code == 0, output
    d = out / "plain"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["stem_like"]["markers"] == ["CD133"]
    assert "CD133" in summary["stem_like"]["definition"]
    assert "PanCK" not in summary["stem_like"]["definition"]
    assert (d / "heatmap_stem_like.png").is_file()
    page = (d / "report.html").read_text(encoding="utf-8")
    assert "stem-like (CD133) regions" in page and 'value="stem_like"' in page
    # the stem-like map's legend names CD133 alone, not the other marker
    legend = page.split('class="legend" data-layer="stem_like"')[1].split("</div>")[0]
    assert "CD133+" in legend and "PanCK" not in legend


def test_stem_like_markers_default_to_the_stem_cell_markers_and_are_checked() -> None:
    old = {"markers": json.dumps(["CD133", "CD44"]), "tile_px": "48", "mpp": "2.0"}
    assert decode_metadata(old, "old.onnx")["stem_like_markers"] == ["CD133", "CD44"]
    other = {**old, "markers": json.dumps(["PanCK", "proSPC"])}
    assert decode_metadata(other, "other.onnx")["stem_like_markers"] == []
    meta = {"markers": ["CD44", "Ki67"], "tile_px": 48, "mpp": 2.0}
    assert json.loads(model_metadata(meta)["stem_like_markers"]) == ["CD44"]
    with pytest.raises(ModelError, match="Ki76"):
        model_metadata({**meta, "stem_like_markers": ["Ki76"]})
    with pytest.raises(ModelError, match="bad.onnx"):
        decode_metadata({**old, "stem_like_markers": json.dumps(["CD99"])}, "bad.onnx")


def test_pixel_size_source_and_warnings_reach_summary_and_report(slides: Path) -> None:
    model = make_model(slides / "pair.onnx", ["CD133", "CD44"])
    slide = slides / "slides" / "plain.tif"
    out = slides / "out_source"
    code, output = infer(str(slide), "--model", str(model), "--out", str(out))
    assert code == 0, output
    summary = json.loads((out / "plain" / "summary.json").read_text())
    assert summary["slide"]["mpp_source"] == "the slide file" and summary["warnings"] == []
    # --override-slide-mpp: said in the summary and on the page, with the warning it gave
    out = slides / "out_override"
    code, output = infer(str(slide), "--model", str(model), "--out", str(out),
                         "--override-slide-mpp", "2.5")
    assert code == 0, output
    summary = json.loads((out / "plain" / "summary.json").read_text())
    assert "--override-slide-mpp" in summary["slide"]["mpp_source"]
    assert any("replaces the pixel size" in w for w in summary["warnings"])
    assert any("upsampled" in w for w in summary["warnings"])  # 2.5 µm/px slide, 2.0 tiles
    page = (out / "plain" / "report.html").read_text(encoding="utf-8")
    assert "--override-slide-mpp" in page and "upsampled" in page
    # a plain image records no pixel size: --slide-mpp is named as its source
    png = slides / "glassless.png"
    cv2.imwrite(str(png), tissue_image(3)[..., ::-1])
    out = slides / "out_png"
    code, output = infer(str(png), "--model", str(model), "--out", str(out), "--slide-mpp", "1")
    assert code == 0, output
    summary = json.loads((out / "glassless" / "summary.json").read_text())
    assert "--slide-mpp" in summary["slide"]["mpp_source"]


def test_cohort_report_links_survive_odd_names_and_name_the_model(slides: Path) -> None:
    model = make_model(slides / "named.onnx", ["CD133", "CD44"])
    out = slides / "out_cohort"
    code, output = infer(str(slides / "slides"), "--model", str(model), "--out", str(out))
    assert code == 0, output
    page = (out / "cohort_report.html").read_text(encoding="utf-8")
    assert 'href="case%231%2050%25/report.html"' in page
    assert (out / "case#1 50%" / "report.html").is_file()
    assert "named.onnx" in page
    with (out / "cohort_summary.csv").open() as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"named.onnx"}


def test_links_keep_their_names_and_two_names_of_one_file_are_said(tmp_path: Path) -> None:
    target = tmp_path / "store" / "cmu-1.tif"
    target.parent.mkdir()
    write_pyramid_tiff_from_array(target, tissue_image(4), SLIDE_MPP, tile=128)
    links = tmp_path / "links"
    links.mkdir()
    for name in ("patientA_HE.tif", "patientB_HE.tif"):
        (links / name).symlink_to(target)
    notes: list[str] = []
    found = find_slides([links], notify=notes.append)
    assert [p.name for p in found] == ["patientA_HE.tif", "patientB_HE.tif"]
    assert len(notes) == 1 and "patientA_HE.tif, patientB_HE.tif are one file" in notes[0]
    # the same path named twice is one slide, and says nothing
    notes.clear()
    assert len(find_slides([links / "patientA_HE.tif"] * 2, notify=notes.append)) == 1
    assert notes == []


def test_a_mixed_folder_says_what_it_left_out(tmp_path: Path) -> None:
    write_pyramid_tiff_from_array(tmp_path / "a.tif", tissue_image(5), SLIDE_MPP, tile=128)
    for name in ("photo.jpg", "scan.png"):
        cv2.imwrite(str(tmp_path / name), tissue_image(6))
    notes: list[str] = []
    assert [p.name for p in find_slides([tmp_path], notify=notes.append)] == ["a.tif"]
    assert len(notes) == 1 and "left out 2 plain image" in notes[0]
    assert "photo.jpg" in notes[0] and "scan.png" in notes[0]
    res = CliRunner().invoke(app, ["tiles", str(tmp_path), "--out", str(tmp_path / "t"),
                                   "--mpp", "2", "--tile-px", "48"])
    assert res.exit_code == 0, res.output
    assert "left out 2 plain image" in res.output


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_print_view_puts_a_tall_slide_on_page_one_with_headings_kept_with_tables(
        slides: Path) -> None:
    assert CHROMIUM is not None
    tall = slides / "tall.tif"
    write_pyramid_tiff_from_array(tall, tissue_image(7, width=420, height=1100), SLIDE_MPP,
                                  tile=128)
    model = make_model(slides / "print.onnx", ["CD133", "CD44"])
    out = slides / "out_print"
    code, output = infer(str(tall), "--model", str(model), "--out", str(out),
                         "--override-slide-mpp", "2.5")  # two warnings above the picture
    assert code == 0, output
    a4 = (794, 1123)  # CSS px of an A4 page
    with Page(CHROMIUM, *a4) as page:
        page.open(out / "tall" / "report.html")
        page.call("Emulation.setEmulatedMedia", {"media": "print"}, session=True)
        bottom = page.evaluate("document.getElementById('stack').getBoundingClientRect().bottom")
        assert bottom <= a4[1] - 2 * 38  # within page 1, under the default 1 cm margins
        after = page.evaluate("[...document.querySelectorAll('h2')].map("
                              "h => getComputedStyle(h).breakAfter)")
        assert after and set(after) == {"avoid"}
        assert page.evaluate("getComputedStyle(document.querySelector('table'))"
                             ".breakInside") == "avoid"


def test_infer_logs_progress_lines_without_a_terminal(slides: Path, monkeypatch) -> None:
    """Without a terminal (SLURM, CI, nohup) infer writes timestamped lines with the count."""
    import re

    monkeypatch.setenv("HISTOCSC_PROGRESS_S", "0.01")
    model = make_model(slides / "log.onnx", ["CD133", "CD44"])
    code, output = infer(str(slides / "slides" / "plain.tif"), "--model", str(model),
                         "--out", str(slides / "out_log"), "--batch", "4")
    assert code == 0, output
    lines = [x for x in output.splitlines() if re.match(r"\d\d:\d\d:\d\d .*plain", x)]
    assert lines and any(re.search(r"\d+/\d+", x) for x in lines), output
