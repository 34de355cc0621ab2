"""What `histocsc prepare` / `label` print: a progress bar while the cases run, then a table
of every case (tiles, labels per marker, registration error, status)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histocsc.cohort import read_cohort
from histocsc.errors import DataError
from histocsc.io import read_json
from histocsc.pipeline.prepare import StageConfigs, run_cohort, summary_path


def summary_table(
    results: list[dict[str, Any]], markers: list[str], title: str = "histocsc prepare"
) -> Any:
    """A rich Table: per case tiles, positives/negatives per marker, registration error, status."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("case")
    table.add_column("tiles", justify="right")
    for m in markers:
        table.add_column(f"{m} +/-/?", justify="right")
        table.add_column(f"{m} reg µm", justify="right")
    table.add_column("status")
    for r in results:
        cells = [r["case"], str(r.get("tiles", "-"))]
        for m in markers:
            q = r.get("markers", {}).get(m, {})
            counts = f"{q['positive']}/{q['negative']}/{q['ignored']}" if "positive" in q else "-"
            err = q.get("registration_error_um")
            cells += [counts, f"{err:.1f}" if isinstance(err, (int, float)) else "-"]
        status = r["status"].upper() if r["status"] != "ok" else "ok"
        notes = [r["error"]] if r.get("error") else []
        notes += [f"{m}: {q['error']}" for m, q in r.get("markers", {}).items() if q.get("error")]
        if r.get("reused"):
            notes.append("(reused)")
        style = {"ok": "green", "flagged": "yellow", "failed": "red"}[r["status"]]
        cells.append(f"[{style}]{status}[/{style}] " + "; ".join(notes))
        table.add_row(*cells)
    return table


def run_and_report(
    cohort_path: Path,
    out: Path,
    cfgs: StageConfigs,
    workers: int,
    reuse_existing: bool,
    command: str,
    force: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Run the cohort with a progress bar, print the summary table; error if a case failed."""
    from rich.console import Console

    from histocsc.progress import progress_bar

    cases = read_cohort(cohort_path).cases
    n_cases = len(cases if shard is None else cases[shard[0] :: shard[1]])
    with progress_bar(command, n_cases, unit="cases") as advance:
        results = run_cohort(cohort_path, out, cfgs, workers, reuse_existing,
                             on_done=lambda _: advance(1), force=force, shard=shard)
    markers = read_json(summary_path(out, shard))["markers"]
    console = Console()
    console.print(summary_table(results, markers, f"histocsc {command}"))
    flagged = [r["case"] for r in results if r["status"] == "flagged"]
    failed = [r for r in results if r["status"] == "failed"]
    if flagged:
        console.print(
            f"[yellow]flagged (labels of the poorly registered markers set to -1; qc.json "
            f"registration_ok false): {', '.join(flagged)}[/yellow]"
        )
    console.print(f"summary: {summary_path(out, shard)}")
    if failed:
        details = "; ".join(r["error"] for r in failed)
        raise DataError(f"{len(failed)} of {len(results)} case(s) failed: {details}")
    return results
