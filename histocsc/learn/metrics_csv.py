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
    """Move metrics.csv out of Lightning's way (appending it to rows set aside before)."""
    current, earlier = log_dir / METRICS_CSV, log_dir / EARLIER_CSV
    if not current.is_file():
        return
    if earlier.is_file():
        _merge(earlier, current, earlier)
        current.unlink()
    else:
        os.replace(current, earlier)


def put_back(log_dir: Path) -> None:
    """metrics.csv = the rows set aside, then this run's rows."""
    current, earlier = log_dir / METRICS_CSV, log_dir / EARLIER_CSV
    if not earlier.is_file():
        return
    if current.is_file():
        _merge(earlier, current, current)
        earlier.unlink()
    else:
        os.replace(earlier, current)


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
