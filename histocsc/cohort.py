"""The cohort table: `case,he,<MARKER>...,split`, one row per case, paths relative to the CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from histocsc.errors import ConfigError, DataError, DataNotFoundError

FIXED_COLUMNS = ("case", "he", "split")
SPLITS = ("train", "val", "test", "")


@dataclass(frozen=True)
class CohortCase:
    """One case: its H&E slide, one IHC slide per marker (None when the cell is empty), split."""

    case: str
    he: Path
    ihc: dict[str, Path | None]
    split: str

    def problems(self, markers: list[str]) -> list[str]:
        """What stops this case from being prepared for `markers` (missing files), as messages."""
        found = []
        if not self.he.is_file():
            found.append(f"case {self.case}: H&E slide not found: {self.he}")
        for marker in markers:
            path = self.ihc.get(marker)
            if path is None:
                found.append(f"case {self.case}: no {marker} IHC slide given in the cohort")
            elif not path.is_file():
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
    with path.open(newline="") as f:
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
    markers = [h for h in header if h not in FIXED_COLUMNS]
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
        cases.append(
            CohortCase(
                case=name,
                he=_resolve(path, cells["he"]),
                ihc={m: _resolve(path, cells[m]) if cells[m] else None for m in markers},
                split=split,
            )
        )
    if not cases:
        raise DataError(f"{path}: cohort has a header but no cases")
    return Cohort(path=path, markers=markers, cases=cases)


def _resolve(csv_path: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (csv_path.parent / p).resolve()
