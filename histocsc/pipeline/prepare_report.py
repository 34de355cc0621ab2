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
    """A rich Table that fits 80 columns: per case tiles, per marker labels (+/-/ignored) and
    registration error, status and short flags; the long notes come from `case_notes`."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("case", overflow="fold")
    table.add_column("tiles", justify="right", no_wrap=True)
    for m in markers:
        table.add_column(f"{m}\n+/-/? reg µm", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for r in results:
        cells = [r["case"], str(r.get("tiles", "-"))]
        for m in markers:
            cells.append(_marker_cell(r.get("markers", {}).get(m, {})))
        status = r["status"].upper() if r["status"] != "ok" else "ok"
        flags = [f"upsampled {r['upsampling']:.0f}x"] if r.get("upsampling") else []
        others = len(r.get("warnings") or []) - bool(flags)
        flags += [f"{others} warning(s)"] if others > 0 else []
        flags += ["reused"] if r.get("reused") else []
        style = {"ok": "green", "flagged": "yellow", "failed": "red"}[r["status"]]
        cells.append(f"[{style}]{status}[/{style}] " + ", ".join(flags))
        table.add_row(*cells)
    return table


def _marker_cell(q: dict[str, Any]) -> str:
    if q.get("no_ihc"):
        return "no IHC"
    counts = f"{q['positive']}/{q['negative']}/{q['ignored']}" if "positive" in q else "-"
    err = q.get("registration_error_um")
    return f"{counts} {err:.1f}" if isinstance(err, (int, float)) else f"{counts} -"


def case_notes(results: list[dict[str, Any]]) -> list[str]:
    """One line per error, per-marker problem, note and warning of every case."""
    lines = []
    for r in results:
        notes = [r["error"]] if r.get("error") else []
        notes += [f"{m}: {q['error']}" for m, q in r.get("markers", {}).items() if q.get("error")]
        notes += list(r.get("notes") or [])
        notes += [f"warning: {w}" for w in r.get("warnings") or []]
        lines += [f"{r['case']}: {n}" for n in notes]
    return lines


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

    from histocsc.progress import log_line, on_terminal, progress_bar

    cases = read_cohort(cohort_path).cases
    n_cases = len(cases if shard is None else cases[shard[0] :: shard[1]])
    def done(result: dict[str, Any], advance: Any) -> None:
        advance(1)
        if not on_terminal():  # a batch log: a line per case as it finishes
            log_line(f"{command}: case {result['case']} {result['status']}"
                     f"{' (reused)' if result.get('reused') else ''}")

    with progress_bar(command, n_cases, unit="cases") as advance:
        results = run_cohort(cohort_path, out, cfgs, workers, reuse_existing,
                             on_done=lambda r: done(r, advance), force=force, shard=shard)
    markers = read_json(summary_path(out, shard))["markers"]
    console = Console()
    console.print(summary_table(results, markers, f"histocsc {command}"))
    for line in case_notes(results):
        print(line)
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
