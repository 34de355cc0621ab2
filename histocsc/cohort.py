"""The cohort table: `case,he,<MARKER>...,split`, one row per case, paths relative to the CSV.

Optional columns: `patient` (cases of one patient always share a split), and slide pixel sizes
in µm/px used only when a slide file records none: `mpp` (every slide of the case), `he_mpp`,
`<MARKER>_mpp`. Every other column is a marker whose cells name IHC slide files. A file saved
by Excel as "CSV UTF-8" (with a byte-order mark) is read as well.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from histocsc.errors import ConfigError, DataError, DataNotFoundError

FIXED_COLUMNS = ("case", "he", "split", "patient", "mpp", "he_mpp")
SPLITS = ("train", "val", "test", "")
MPP_SUFFIX = "_mpp"


@dataclass(frozen=True)
class CohortCase:
    """One case: its H&E slide, one IHC slide per marker (None when the cell is empty), split."""

    case: str
    he: Path
    ihc: dict[str, Path | None]
    split: str
    patient: str = ""
    mpp: dict[str, float] = field(default_factory=dict)  # "he" / marker -> fallback µm/px

    def slide_mpp(self, slide: str, default: float | None = None) -> float | None:
        """The pixel size to use for `slide` ("he" or a marker) when its file records none."""
        return self.mpp.get(slide, self.mpp.get("*", default))

    def problems(self, markers: list[str]) -> list[str]:
        """What stops this case from being prepared for `markers` (files named but missing), as
        messages. An empty marker cell is no problem: the case has no IHC for that marker, and
        its labels for it are ignored (-1), not negative."""
        found = []
        if not self.he.is_file():
            found.append(f"case {self.case}: H&E slide not found: {self.he}")
        for marker in markers:
            path = self.ihc.get(marker)
            if path is not None and not path.is_file():
                found.append(f"case {self.case}: {marker} IHC slide not found: {path}")
        return found


@dataclass(frozen=True)
class Cohort:
    """A parsed cohort.csv."""

    path: Path
    markers: list[str]
    cases: list[CohortCase]

    def select_markers(self, wanted: list[str] | None) -> list[str]:
        """The markers to label: `wanted` (all must be cohort columns) or every cohort marker."""
        if wanted is None:
            return list(self.markers)
        absent = [m for m in wanted if m not in self.markers]
        if absent:
            raise ConfigError(
                f"{self.path}: marker(s) {', '.join(absent)} named in the configuration are not "
                f"columns of the cohort (its markers: {', '.join(self.markers) or 'none'})"
            )
        return list(wanted)


def read_cohort(path: str | Path) -> Cohort:
    """Parse and check the table's structure; missing slide files are reported per case later."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: cohort file not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: cohort file is empty (expected header case,he,<MARKER>...,split)")
    header = [h.strip() for h in rows[0]]
    for col in ("case", "he"):
        if col not in header:
            raise DataError(f"{path}: no {col!r} column in header {','.join(header)}")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: repeated column in header {','.join(header)}")
    markers = [h for h in header if h not in FIXED_COLUMNS and not h.endswith(MPP_SUFFIX)]
    for col in header:
        if col.endswith(MPP_SUFFIX) and col not in FIXED_COLUMNS:
            if col[: -len(MPP_SUFFIX)] not in markers:
                raise DataError(f"{path}: column {col!r} names the pixel size of marker "
                                f"{col[: -len(MPP_SUFFIX)]!r}, which is not a column")
    if not markers:
        raise DataError(f"{path}: no marker column (expected e.g. case,he,CD133,CD44,split)")
    cases: list[CohortCase] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line_no} has {len(row)} fields, header {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        name = cells["case"]
        if not name or name in seen or "/" in name or name.startswith("."):
            raise DataError(
                f"{path}: line {line_no}: case name {name!r} is empty, repeated or "
                "not a plain folder name"
            )
        seen.add(name)
        split = cells.get("split", "")
        if split not in SPLITS:
            raise DataError(f"{path}: line {line_no}: split {split!r} is not train, val or test")
        if not cells["he"]:
            raise DataError(f"{path}: line {line_no}: case {name} has no H&E path")
        for m in markers:
            _check_marker_cell(path, line_no, m, cells[m])
        cases.append(
            CohortCase(
                case=name,
                he=_resolve(path, cells["he"]),
                ihc={m: _resolve(path, cells[m]) if cells[m] else None for m in markers},
                split=split,
                patient=cells.get("patient", ""),
                mpp=_pixel_sizes(path, line_no, cells, markers),
            )
        )
    if not cases:
        raise DataError(f"{path}: cohort has a header but no cases")
    return Cohort(path=path, markers=markers, cases=cases)


def _check_marker_cell(path: Path, line_no: int, column: str, value: str) -> None:
    """A marker column holds IHC slide files (names with a file extension); anything else, e.g.
    a number, means an undeclared column."""
    suffix = Path(value).suffix[1:]
    if value and not (suffix[:1].isalpha() and suffix.isalnum()):
        raise DataError(
            f"{path}: line {line_no}: column {column!r} holds {value!r}, not a slide file; a "
            f"column other than {', '.join(FIXED_COLUMNS)} or <MARKER>{MPP_SUFFIX} is a marker "
            "and must name its IHC slides (remove or rename the column)")


def _pixel_sizes(
    path: Path, line_no: int, cells: dict[str, str], markers: list[str]
) -> dict[str, float]:
    """The case's pixel-size cells: '*' (column mpp), 'he', and markers."""
    named = {"*": "mpp", "he": "he_mpp", **{m: f"{m}{MPP_SUFFIX}" for m in markers}}
    out: dict[str, float] = {}
    for key, column in named.items():
        text = cells.get(column, "")
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value < 1000:
            raise DataError(f"{path}: line {line_no}: {column} {text!r} is not a pixel size "
                            "(a positive number of µm per pixel)")
        out[key] = value
    return out


def _resolve(csv_path: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (csv_path.parent / p).resolve()
