"""Server paths out of what clients see: job outputs and error messages.

`summary.json`, `run_manifest.json` and `report.html` record the absolute slide and model paths
(right for `histocsc infer` on one's own files); a client of the service sees the slide as it
named it (relative to `--slides-root`, or the upload's own name) and the model by file name.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from histocsc.io import atomic_path

TEXT_SUFFIXES = (".json", ".html", ".geojson", ".csv", ".txt")
Pairs = list[tuple[str, str]]


def redactions(slide: Path, shown: str, model: Path, folders: list[Path]) -> Pairs:
    """(server text, client text) pairs, longest first: the slide path, the model path, then any
    other path under the server's folders (their prefix dropped)."""
    pairs = [(str(slide), shown), (str(slide.resolve()), shown),
             (str(model.resolve()), model.name), (str(model), model.name)]
    for folder in folders:
        for f in {str(folder), str(folder.resolve())}:
            pairs += [(f + "/", ""), (f, ".")]
    return sorted({p for p in pairs if p[0] not in ("", ".")}, key=lambda p: -len(p[0]))


def redact(text: str, pairs: Pairs) -> str:
    """`text` with each server string replaced, as written raw, HTML-escaped or JSON-escaped."""
    for old, new in pairs:
        for enc in (str, html.escape, lambda s: json.dumps(s)[1:-1]):
            text = text.replace(enc(old), enc(new))
    return text


def redact_outputs(folder: Path, pairs: Pairs) -> None:
    """Rewrite the text outputs in `folder` that hold server paths (atomically, one by one)."""
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        clean = redact(text, pairs)
        if clean != text:
            with atomic_path(path) as tmp:
                tmp.write_text(clean, encoding="utf-8")
