"""report.html and the cohort summary: written by `infer` with the built-in model, self-contained,
numbers and overlays true to the outputs, and working in a real (headless) browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histocsc.cli import app
from histocsc.predict.browser import Page, find_chromium
from histocsc.predict.report import cell_index
from histocsc.synthetic.generate import make_cohort

SLIDE = "case000_HE"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`histocsc infer FOLDER --out OUT` (no --model) on a phantom H&E and a corrupt file."""
    root = tmp_path_factory.mktemp("report")
    make_cohort(root / "phantom", 1, size_px=1536, mpp=1.0, markers=("CD133", "CD44"), seed=11)
    slides = root / "slides"
    slides.mkdir()
    (slides / f"{SLIDE}.tiff").symlink_to(root / "phantom" / "case000" / f"{SLIDE}.tiff")
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    res = CliRunner().invoke(app, ["infer", str(slides), "--out", str(root / "out")])
    return {"root": root, "out": root / "out", "code": res.exit_code, "output": res.output,
            "slide_dir": root / "out" / SLIDE}


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def parse(path: Path) -> list[tuple[str, dict[str, str]]]:
    parser = Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tags


def test_infer_without_model_uses_the_builtin_one_and_says_so(run: dict) -> None:
    assert run["code"] == 1, run["output"]  # the corrupt file fails, the slide does not
    first = run["output"].splitlines()[0]
    assert "built-in model" in first and "research use only" in first, first
    summary = json.loads((run["slide_dir"] / "summary.json").read_text())
    assert summary["model"]["builtin"] is True
    assert "not a diagnostic device" in summary["model"]["intended_use"]
    assert "report.html" in summary["outputs"]
    assert (run["slide_dir"] / "report.html").is_file()


def test_report_is_self_contained(run: dict) -> None:
    page = run["slide_dir"] / "report.html"
    text = page.read_text(encoding="utf-8")
    tags = parse(page)
    assert not [t for t, a in tags if t in ("link", "iframe", "object", "embed")]
    assert all("src" not in a for t, a in tags if t == "script")  # inline scripts only
    for tag, attrs in tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith("data:image/"), (tag, attrs[key][:80])
    assert "url(" not in text and "@import" not in text
    assert "default-src 'none'" in text  # the page may load nothing from anywhere
    assert sum(t == "img" for t, _ in tags) >= 1 + 2 * 3  # thumbnail, 3 overlays + outlines


def test_report_states_the_summary_and_model_facts(run: dict) -> None:
    text = (run["slide_dir"] / "report.html").read_text(encoding="utf-8")
    summary = json.loads((run["slide_dir"] / "summary.json").read_text())
    assert f"{summary['tissue_area_mm2']:.3f} mm²" in text
    for marker, row in summary["markers"].items():
        assert re.search(rf"<th>{marker}</th><td class=num>{row['threshold']:.2f}</td>"
                         rf"<td class=num>{row['mean_probability']:.3f}</td>"
                         rf"<td class=num>{row['tiles_above_threshold']}</td>", text), marker
    stem = 100 * summary["stem_like"]["area_fraction"]
    assert f"<td class=num>{stem:.1f}</td></tr>" in text
    assert summary["model"]["checksum"] in text
    assert "research use only" in text and "held-out phantom AUROC CD133" in text


def overlay(page: Path, layer: str) -> np.ndarray:
    """The decoded overlay image of one layer of a report."""
    for tag, attrs in parse(page):
        if tag == "img" and attrs.get("data-layer") == layer and "overlay" in attrs["class"]:
            data = base64.b64decode(attrs["src"].split(",", 1)[1])
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    raise AssertionError(f"no overlay {layer}")


def test_overlay_colours_are_the_tile_scores_at_the_tile_positions(run: dict) -> None:
    from matplotlib import colormaps

    slide_dir = run["slide_dir"]
    geometry = json.loads((slide_dir / "score_grid.json").read_text())
    image = overlay(slide_dir / "report.html", "CD44")
    h, w = image.shape[:2]
    with (slide_dir / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 20
    sx, sy = w / geometry["slide_width"], h / geometry["slide_height"]
    for r in rows[:: max(1, len(rows) // 25)]:
        cx = (int(r["x"]) + int(r["w"]) / 2) * sx  # the tile centre in thumbnail pixels
        cy = (int(r["y"]) + int(r["h"]) / 2) * sy
        got = image[int(cy), int(cx)]
        want = np.array(colormaps["inferno"](float(r["CD44"]))[:3]) * 255
        assert got[3] == 255
        assert np.abs(got[:3].astype(float) - want).max() <= 2.0, (r, got, want)
    corner = image[0, 0]  # glass at the slide corner: not scored, transparent
    assert corner[3] == 0


def test_cell_index_gives_each_cell_its_own_stride_square() -> None:
    geometry = {"step_px": 100.0, "tile_size_px": 200.0, "slide_width": 1000,
                "slide_height": 500, "shape": [5, 10, 1]}
    rows, cols = cell_index(geometry, 50, 100)  # 10 level-0 px per thumbnail px
    # cell c spans [100 c, 100 c + 100), as score_grid.json and the heatmap PNGs place it:
    # pixel 9 (x 95) is cell 0, pixel 10 (x 105) is cell 1
    assert cols[0] == 0 and cols[9] == 0 and cols[10] == 1 and cols[19] == 1
    assert cols[-1] == 9 and rows[9] == 0 and rows[10] == 1 and rows[49] == 4
    _, cols = cell_index({**geometry, "shape": [5, 9, 1]}, 50, 100)
    assert cols[89] == 8 and cols[90] == -1  # past the last cell of a 9-column grid


def test_cohort_summary_lists_every_slide_with_failures_and_links(run: dict) -> None:
    out = run["out"]
    with (out / "cohort_summary.csv").open() as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert set(rows) == {SLIDE, "broken"}
    bad = rows["broken"]
    assert bad["status"] == "failed" and "broken.svs" in bad["reason"] and not bad["report"]
    good = rows[SLIDE]
    summary = json.loads((run["slide_dir"] / "summary.json").read_text())
    assert good["status"] == "done" and int(good["tiles"]) == summary["tiles"]
    assert float(good["CD133_area_fraction"]) == pytest.approx(
        summary["markers"]["CD133"]["area_fraction_above_threshold"], abs=1e-6)
    assert float(good["stem_like_area_fraction"]) == pytest.approx(
        summary["stem_like"]["area_fraction"], abs=1e-6)
    assert good["report"] == f"{SLIDE}/report.html"
    page = out / "cohort_report.html"
    links = [a["href"] for t, a in parse(page) if t == "a"]
    assert links == [f"{SLIDE}/report.html"]
    assert (out / links[0]).is_file()
    assert "not a slide format" in page.read_text(encoding="utf-8")
    # a rerun skips the finished slide and keeps it, and the failure, in the table
    res = CliRunner().invoke(app, ["infer", str(run["root"] / "slides"), "--out", str(out)])
    assert res.exit_code == 1
    with (out / "cohort_summary.csv").open() as f:
        again = {r["slide"]: r["status"] for r in csv.DictReader(f)}
    assert again == {SLIDE: "done", "broken": "failed"}


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_works_in_headless_chromium(run: dict, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    with Page(CHROMIUM, 1200, 900) as page:
        page.open(run["slide_dir"] / "report.html")
        assert page.evaluate("document.body.getAttribute('data-shown')") == "stem_like"
        box = page.evaluate("(() => { const r = document.getElementById('stack')"
                            ".getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]"
                            "; })()")
        assert box[2] - box[0] > 300 and box[3] - box[1] > 300  # the picture is on screen

        def viewer() -> bytes:
            """The pixels of the slide picture."""
            image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            return image.crop(tuple(round(v) for v in box)).tobytes()

        def pick(layer: str) -> bytes:
            page.evaluate(f"document.querySelector('input[value={layer}]').click()")
            assert page.evaluate("document.body.getAttribute('data-shown')") == layer
            return viewer()

        stem = viewer()
        cd133, cd44, none = pick("CD133"), pick("CD44"), pick("none")
        assert len({stem, cd133, cd44, none}) == 4  # each overlay changes the picture
        pick("CD133")
        page.evaluate("var s = document.getElementById('opacity'); s.value = 0;"
                      "s.dispatchEvent(new Event('input'));"
                      "document.getElementById('outline').click()")
        assert viewer() == none  # opacity 0 and no outline: the bare slide
        page.call("Emulation.setEmulatedMedia", {"media": "print"}, session=True)
        assert page.evaluate(
            "getComputedStyle(document.querySelector('.controls')).display") == "none"
        assert page.errors == []
        assert page.external_requests() == []
