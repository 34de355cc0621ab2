"""report.html: one self-contained page per slide for the person who reads the result.

The page embeds everything (base64 images, inline CSS and JavaScript; a Content-Security-Policy
forbids any other source), so it opens from disk, by e-mail or on a computer without network.
It shows the slide thumbnail under one overlay at a time (each marker's probability, the combined
stem-like map, or none) with an opacity slider and the threshold outline, the colour bar, the
summary table, the slide and QC facts, the model's card facts and versions, and the run's
warnings. It prints as a readable page.
"""

from __future__ import annotations

import base64
import html
import io
import platform
import time
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from histocsc import __version__
from histocsc.io import atomic_path, read_json
from histocsc.predict.outputs import (
    MARKER_COLORS,
    SCORE_GRID,
    SCORE_GRID_JSON,
    stem_like_markers,
)

REPORT = "report.html"
STEM = "stem_like"
OUTLINE_RGBA = (0, 200, 215, 255)
BOTH_RGB = (255, 215, 0)
SOME_RGB = (255, 105, 180)
BELOW = (128, 128, 128, 60)
VIEW_BOX = (860, 800)  # CSS px the picture is fitted into on screen


def template(name: str) -> str:
    """A file of the templates folder (package data)."""
    return resources.files("histocsc.predict").joinpath("templates", name).read_text("utf-8")


def encode(image: np.ndarray, fmt: str = "PNG") -> str:
    """Base64 text of an image array (PNG, or JPEG for the photo-like thumbnail)."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(image).save(buf, format="JPEG", quality=88)
    else:
        Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def cell_index(geometry: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, ...]:
    """Row and column of the score-grid cell under each thumbnail pixel (-1 outside the grid):
    cell (r, c) covers its own square [c, c + 1) x [r, r + 1) * step_px (score_grid.json), as
    the heatmap PNGs draw it (with overlap the grid is blended at the stride)."""
    step = float(geometry["step_px"])
    sy = geometry["slide_height"] / height
    sx = geometry["slide_width"] / width
    rows_n, cols_n = geometry["shape"][:2]
    r = np.floor(((np.arange(height) + 0.5) * sy) / step).astype(np.int64)
    c = np.floor(((np.arange(width) + 0.5) * sx) / step).astype(np.int64)
    r[(r < 0) | (r >= rows_n)] = -1
    c[(c < 0) | (c >= cols_n)] = -1
    return r, c


def upsample(cells: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A per-cell RGBA image (rows, cols, 4) as thumbnail pixels; transparent off the grid."""
    out = cells[np.clip(rows, 0, None)[:, None], np.clip(cols, 0, None)[None, :]]
    out[(rows < 0)[:, None] | (cols < 0)[None, :]] = 0
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """RGBA image with the border pixels of `mask` (H, W) drawn in the outline colour."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge = mask & ~inner
    edge = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # two pixels wide
    out = np.zeros((*mask.shape, 4), np.uint8)
    out[edge & mask] = OUTLINE_RGBA
    return out


def marker_layers(grid: np.ndarray, markers: list[str], thresholds: dict[str, float],
                  rows: np.ndarray, cols: np.ndarray, stem_like: list[str] | None = None,
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer name: (overlay RGBA, threshold-outline RGBA) at thumbnail size; the stem-like
    layer joins the `stem_like` markers (default all; none: no such layer)."""
    stem_like = list(markers) if stem_like is None else stem_like
    from matplotlib import colormaps

    cmap = colormaps["inferno"]
    scored = np.isfinite(grid[..., 0])
    layers = {}
    code = np.zeros(grid.shape[:2], np.int64)
    for j, m in enumerate(markers):
        p = np.nan_to_num(grid[..., j], nan=0.0)
        rgba = (cmap(p) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(scored, 255, 0)
        above = scored & (p >= thresholds[m])
        if m in stem_like:
            code |= above.astype(np.int64) << stem_like.index(m)
        pix = upsample(rgba, rows, cols)
        layers[m] = (pix, outline(upsample(above.astype(np.uint8)[..., None], rows, cols)[..., 0]
                                  .astype(bool)))
    if not stem_like:
        return layers
    stem = np.zeros((*grid.shape[:2], 4), np.uint8)
    stem[scored] = BELOW
    for value in np.unique(code[code > 0]):
        stem[code == value] = (*combo_rgb(int(value), stem_like), 255)
    pix = upsample(stem, rows, cols)
    layers[STEM] = (pix, outline(upsample((code > 0).astype(np.uint8)[..., None], rows, cols)
                                 [..., 0].astype(bool)))
    return layers


def combo_rgb(value: int, markers: list[str]) -> tuple[int, int, int]:
    """Colour of a set of markers above threshold (bit j = marker j), as plot_stem_map."""
    names = [m for j, m in enumerate(markers) if value >> j & 1]
    if len(names) == 1:
        return tuple(MARKER_COLORS[markers.index(names[0]) % len(MARKER_COLORS)])  # type: ignore
    return BOTH_RGB if len(names) == len(markers) else SOME_RGB


def colorbar_png() -> str:
    """The inferno colour map as a 256 x 1 PNG."""
    from matplotlib import colormaps

    ramp = (colormaps["inferno"](np.linspace(0, 1, 256))[None, :, :3] * 255).astype(np.uint8)
    return encode(ramp)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(rows: list[tuple[str, Any]]) -> str:
    """A two-column facts table (values escaped)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows
                   if v not in (None, ""))
    return f"<table class=facts>{body}</table>"


def fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_table(summary: dict[str, Any]) -> str:
    """Tissue area, then per marker and for the stem-like union: mean probability, tiles and
    area above threshold."""
    head = ("<tr><th></th><th class=num>threshold</th><th class=num>mean P</th>"
            "<th class=num>tiles above</th><th class=num>mm² above</th>"
            "<th class=num>% tissue</th></tr>")
    rows = []
    for m, r in summary.get("markers", {}).items():
        rows.append(f"<tr><th>{esc(m)}</th><td class=num>{fmt(r['threshold'], 2)}</td>"
                    f"<td class=num>{fmt(r['mean_probability'])}</td>"
                    f"<td class=num>{r['tiles_above_threshold']}</td>"
                    f"<td class=num>{fmt(r['area_above_threshold_mm2'])}</td>"
                    f"<td class=num>{100 * r['area_fraction_above_threshold']:.1f}</td></tr>")
    stem = summary.get("stem_like")
    if stem:
        rows.append(f"<tr><th>stem-like</th><td></td><td></td><td></td>"
                    f"<td class=num>{fmt(stem.get('area_mm2'))}</td>"
                    f"<td class=num>{100 * stem.get('area_fraction', 0.0):.1f}</td></tr>")
    total = (f"<p>Tissue: <b>{fmt(summary.get('tissue_area_mm2'))} mm²</b> in "
             f"<b>{summary.get('tiles', 0)}</b> tiles.</p>")
    return f"{total}<table>{head}{''.join(rows)}</table>"


def qc_rows(summary: dict[str, Any], qc: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """Slide facts, and registration / QC facts when the caller knows them."""
    s = summary.get("slide", {})
    rows: list[tuple[str, Any]] = [
        ("file", s.get("path")), ("size (px)", f"{s.get('width')} x {s.get('height')}"),
        ("pixel size", f"{s['mpp']:.4g} µm/px" if s.get("mpp") else None),
        ("pixel size from", s.get("mpp_source")), ("scanner", s.get("vendor")),
        ("checksum", s.get("checksum")),
    ]
    for key, value in {**(summary.get("qc") or {}), **(qc or {})}.items():
        rows.append((str(key).replace("_", " "), value))
    return rows


def model_rows(model: dict[str, Any], card: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The model's metadata, its card facts when it is the built-in model, and versions."""
    import onnxruntime
    import openslide

    rows: list[tuple[str, Any]] = [
        ("model", Path(str(model.get("path", ""))).name), ("checksum", model.get("checksum")),
        ("markers", ", ".join(model.get("markers", []))),
        ("tile", f"{model.get('tile_px')} px at {model.get('mpp')} µm/px"),
        ("backbone", model.get("backbone")), ("precision", model.get("precision")),
        ("trained with histocsc", model.get("histocsc_version")),
        ("device", model.get("device")),
    ]
    if card:
        rows += [("intended use", card["intended_use"]),
                 ("training data", f"{card['training']['cases']} phantom cases, seed "
                                   f"{card['training']['seed']}")]
        for m, h in card["heldout"]["markers"].items():
            rows.append((f"held-out phantom AUROC {m}",
                         f"{h['auroc']['mean']:.3f} ({h['auroc']['min']:.3f}-"
                         f"{h['auroc']['max']:.3f} over {len(card['heldout']['seeds'])} seeds)"))
        rows.append(("model card", "models/MODEL_CARD.md in the histocsc source"))
    rows += [("histocsc", __version__), ("onnxruntime", onnxruntime.__version__),
             ("OpenSlide", getattr(openslide, "__library_version__", "")),
             ("Python", platform.python_version())]
    return rows


def run_warnings(summary: dict[str, Any], card: dict[str, Any] | None) -> list[str]:
    """The run's own warnings plus what the page itself can tell."""
    out = [str(w) for w in summary.get("warnings", [])]
    if summary.get("tiles", 0) == 0:
        out.append("no tissue tile was found: nothing was scored")
    elif summary.get("tiles", 0) < 20:
        out.append(f"only {summary['tiles']} tiles were scored: figures are coarse")
    return out


def write_report(out_dir: str | Path, summary: dict[str, Any], thumbnail: np.ndarray,
                 qc: dict[str, Any] | None = None) -> Path:
    """Write OUT_DIR/report.html from the slide's summary, its thumbnail (RGB uint8) and the
    score grid already written in OUT_DIR. Returns the path."""
    from histocsc.models import builtin_card, is_builtin

    out_dir = Path(out_dir)
    geometry = read_json(out_dir / SCORE_GRID_JSON)
    grid = np.load(out_dir / SCORE_GRID)
    markers, thresholds = list(geometry["markers"]), geometry["thresholds"]
    h, w = thumbnail.shape[:2]
    rows, cols = cell_index(geometry, h, w)
    model = summary.get("model", {})
    stem_like = stem_like_markers({"markers": markers, **model})
    layers = marker_layers(grid, markers, thresholds, rows, cols, stem_like)
    card = builtin_card() if is_builtin(str(model.get("checksum", ""))) else None
    first = STEM if STEM in layers and len(markers) > 1 else markers[0]
    buttons, images, legends = [], [], []
    for name, (overlay, edge) in layers.items():
        label = "stem-like map" if name == STEM else f"P({name}+)"
        checked = " checked" if name == first else ""
        buttons.append(f'<label><input type="radio" name="layer" value="{esc(name)}"{checked}> '
                       f"{esc(label)}</label>")
        images.append(f'<img class="layer overlay" data-layer="{esc(name)}" alt="{esc(label)}" '
                      f'src="data:image/png;base64,{encode(overlay)}">')
        images.append(f'<img class="layer outline" data-layer="{esc(name)}" alt="" '
                      f'src="data:image/png;base64,{encode(edge)}">')
        legends.append(legend(name, stem_like if name == STEM else markers, thresholds))
    buttons.append('<label><input type="radio" name="layer" value="none"> none</label>')
    warnings = run_warnings(summary, card)
    notice = (f'<p class="notice"><b>Built-in demonstration model:</b> {esc(card["intended_use"])}.'
              " Its map shows what a model trained on phantom slides responds to, not where "
              "stem-like cells are.</p>") if card else ""
    page = Template(template(REPORT)).substitute(
        css=template("report.css"),
        slide_name=esc(summary.get("slide", {}).get("name", out_dir.name)),
        subject=esc(subject(markers, stem_like)),
        print_width=f"{min(170.0, 190.0 * w / h):.0f}mm",
        created=esc(time.strftime("Written %Y-%m-%d %H:%M %Z.")),
        notice=notice,
        warnings=("<ul class=warnings>" + "".join(f"<li>{esc(x)}</li>" for x in warnings)
                  + "</ul>") if warnings else "",
        layer_buttons="\n".join(buttons), thumbnail=encode(thumbnail, "JPEG"), width=w, height=h,
        view_width=round(w * min(VIEW_BOX[0] / w, VIEW_BOX[1] / h)),
        layer_images="\n".join(images), legends="\n".join(legends),
        summary_table=summary_table(summary), qc_table=table(qc_rows(summary, qc)),
        model_table=table(model_rows(model, card)),
        footer=esc(f"histocsc {__version__}. Probabilities are per tile of "
                   f"{geometry['tile_size_px'] * geometry['slide_mpp']:.0f} µm; the outline "
                   "marks tiles at or above the threshold. Files beside this page: "
                   "scores.csv, tiles.geojson (QuPath), score_grid.npy, summary.json."),
    )
    path = out_dir / REPORT
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def subject(markers: list[str], stem_like: list[str]) -> str:
    """What the page shows, in the model's own words: 'stem-like (CD133 / CD44) regions' when the
    model defines a stem-like map, else 'PanCK-positive regions'."""
    if stem_like:
        return f"stem-like ({' / '.join(stem_like)}) regions"
    return f"{' / '.join(markers)}-positive regions"


def legend(name: str, markers: list[str], thresholds: dict[str, float]) -> str:
    """The colour bar with its threshold (a marker) or the colour key (the stem-like map)."""
    if name != STEM:
        t = float(thresholds[name])
        return (f'<div class="legend" data-layer="{esc(name)}">P({esc(name)}+), threshold '
                f"<b>{t:.2f}</b> (cyan)<div class=colorbar><img alt='' src='data:image/png;base64,"
                f"{colorbar_png()}'><span class=thr style='left:calc({100 * t:.1f}% - 1px)'>"
                "</span></div><div class=ticks><span>0</span><span>0.25</span><span>0.5</span>"
                "<span>0.75</span><span>1</span></div></div>")
    keys = []
    for value in range(1, 2 ** len(markers)):
        names = [m for j, m in enumerate(markers) if value >> j & 1]
        r, g, b = combo_rgb(value, markers)
        keys.append(f'<span class=swatch style="background:rgb({r},{g},{b})"></span>'
                    + esc(" + ".join(f"{n}+" for n in names)))
    keys.append('<span class=swatch style="background:rgba(128,128,128,0.25)"></span>'
                "tissue below every threshold")
    return (f'<div class="legend" data-layer="{STEM}">Tiles at or above the threshold of a '
            f"marker:<br>{''.join(keys)}</div>")
