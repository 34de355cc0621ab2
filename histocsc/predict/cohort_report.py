"""cohort_summary.csv and cohort_report.html: one row per slide of an inference output folder.

Rows come from every slide folder under OUT (so the shards of a SLURM array, and earlier runs,
all appear): finished slides from their summary.json, failed ones from the failure.json written
here for this run's failures (a later success supersedes it). Each row links to the slide's
report.html.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from histocsc import __version__
from histocsc.io import atomic_path, read_json, write_json
from histocsc.predict.outputs import SUMMARY
from histocsc.predict.report import REPORT, esc, template

COHORT_CSV = "cohort_summary.csv"
COHORT_HTML = "cohort_report.html"
FAILURE = "failure.json"


def record_failures(out: Path, failed: list[tuple[Path, str]]) -> None:
    """Write OUT/<slide>/failure.json for each failed slide of this run."""
    for path, reason in failed:
        write_json(out / path.stem / FAILURE, {"slide": str(path), "reason": reason,
                                               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def slide_rows(out: Path, slides: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per slide folder in OUT and per slide of this run; the markers seen."""
    names = {p.stem: p for p in slides}
    folders = sorted({d.name for d in out.iterdir() if d.is_dir()} | set(names)) \
        if out.is_dir() else sorted(names)
    rows, markers = [], []
    for name in folders:
        folder = out / name
        if (folder / SUMMARY).is_file():
            s = read_json(folder / SUMMARY)
            for m in s.get("markers", {}):
                if m not in markers:
                    markers.append(m)
            rows.append({"slide": name, "status": "done", "reason": "", "summary": s,
                         "report": quote(f"{name}/{REPORT}") if (folder / REPORT).is_file()
                         else ""})
        elif (folder / FAILURE).is_file():
            rows.append({"slide": name, "status": "failed",
                         "reason": read_json(folder / FAILURE).get("reason", ""), "report": ""})
        elif name in names:
            rows.append({"slide": name, "status": "not done", "reason": "", "report": ""})
    return rows, markers


def flat(row: dict[str, Any], markers: list[str]) -> dict[str, Any]:
    """The CSV columns of one row."""
    s = row.get("summary") or {}
    out: dict[str, Any] = {"slide": row["slide"], "status": row["status"],
                           "reason": row["reason"], "tiles": s.get("tiles", ""),
                           "tissue_area_mm2": _round(s.get("tissue_area_mm2"))}
    per = s.get("markers", {})
    for m in markers:
        r = per.get(m, {})
        out[f"{m}_area_fraction"] = _round(r.get("area_fraction_above_threshold"))
        out[f"{m}_mean_probability"] = _round(r.get("mean_probability"))
    out["stem_like_area_fraction"] = _round((s.get("stem_like") or {}).get("area_fraction"))
    out["model"] = Path(str(s.get("model", {}).get("path", ""))).name if s else ""
    out["model_checksum"] = s.get("model", {}).get("checksum", "")
    out["report"] = row["report"]
    return out


def _round(value: Any) -> Any:
    return "" if value is None else round(float(value), 6)


def write_cohort_summary(out: str | Path, slides: list[Path],
                         failed: list[tuple[Path, str]]) -> tuple[Path, Path]:
    """Record this run's failures, then write OUT/cohort_summary.csv and cohort_report.html."""
    out = Path(out)
    record_failures(out, failed)
    rows, markers = slide_rows(out, slides)
    table = [flat(r, markers) for r in rows]
    columns = list(table[0]) if table else ["slide", "status", "reason"]
    csv_path, html_path = out / COHORT_CSV, out / COHORT_HTML
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    with atomic_path(html_path) as tmp:
        tmp.write_text(render(table, markers, rows), encoding="utf-8")
    return csv_path, html_path


def render(table: list[dict[str, Any]], markers: list[str], rows: list[dict[str, Any]]) -> str:
    """The cohort page: counts, then one linked row per slide."""
    head = ["slide", "status", "tiles", "tissue (mm²)",
            *(f"{m}+ (% tissue)" for m in markers), "stem-like (% tissue)", "reason"]
    body = []
    for r in table:
        name = esc(r["slide"])
        link = f'<a href="{esc(r["report"])}">{name}</a>' if r["report"] else name
        pct = [f"{100 * r[f'{m}_area_fraction']:.1f}" if r[f"{m}_area_fraction"] != "" else ""
               for m in markers]
        stem = r["stem_like_area_fraction"]
        cells = [link, esc(r["status"]), r["tiles"], r["tissue_area_mm2"], *pct,
                 f"{100 * stem:.1f}" if stem != "" else "", esc(r["reason"])]
        css = ' class="failed"' if r["status"] == "failed" else ""
        body.append(f"<tr{css}>" + "".join(
            f"<td{' class=num' if 1 < i < len(cells) - 1 else ''}>{c}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "not done")}
    models = sorted({(r["model"], r["model_checksum"]) for r in table if r["model_checksum"]})
    named = ", ".join(f"<b>{esc(n)}</b> (checksum {esc(c[:12])})" for n, c in models)
    note = (f"<p>Model: {named}.</p>" if len(models) == 1 else
            f'<p class="warnings">These slides were scored by {len(models)} different models: '
            f"{named}.</p>" if models else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>histocsc cohort report</title><style>{template("report.css")}</style></head><body>
<h1>Cohort report</h1>
<p class="sub">{len(rows)} slides: {counts['done']} done, {counts['failed']} failed,
{counts['not done']} not done. Area fractions are tissue above each marker's threshold;
stem-like is any of the model's stem-cell markers. Open a slide's name for its report.</p>{note}
<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>
{chr(10).join(body)}</table>
<footer>{esc(f"histocsc {__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")}; the same
table: {COHORT_CSV}.</footer></body></html>
"""
