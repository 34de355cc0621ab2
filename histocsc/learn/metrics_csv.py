"""Keep the rows of an earlier run in RUN/logs/metrics.csv across a resume.

Lightning's CSVLogger starts `metrics.csv` afresh in a folder that has one, so before training
the earlier rows are set aside (`metrics.earlier.csv`) and afterwards put back in front of the new
ones, under the union of both headers. Only the file format is relied upon, not Lightning's
internals. A run that fails in between leaves the earlier rows set aside; the next run keeps them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from histocsc.io import atomic_path

METRICS_CSV = "metrics.csv"
EARLIER_CSV = "metrics.earlier.csv"


def set_aside(log_dir: Path) -> None:
    """Move metrics.csv out of Lightning's way (after rows set aside before, if any)."""
    if (log_dir / METRICS_CSV).is_file():
        _fold(log_dir / EARLIER_CSV, log_dir / METRICS_CSV, into=log_dir / EARLIER_CSV)


def put_back(log_dir: Path) -> None:
    """metrics.csv = the rows set aside, then this run's rows."""
    if (log_dir / EARLIER_CSV).is_file():
        _fold(log_dir / EARLIER_CSV, log_dir / METRICS_CSV, into=log_dir / METRICS_CSV)


def _fold(first: Path, second: Path, into: Path) -> None:
    """`into` = the rows of `first` then those of `second` (either may be absent); the other
    file is removed."""
    present = [p for p in (first, second) if p.is_file()]
    if len(present) == 2:
        _merge(first, second, into)
    elif present and present[0] != into:
        os.replace(present[0], into)
    for path in (first, second):
        if path != into:
            path.unlink(missing_ok=True)


def _merge(first: Path, second: Path, out: Path) -> None:
    """Rows of `first` then `second` into `out`, columns: both headers' union, sorted."""
    tables = [_read(first), _read(second)]
    header = sorted({key for fields, _ in tables for key in fields})
    with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for _, rows in tables:
            writer.writerows(rows)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows
