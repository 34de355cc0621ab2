"""`histocsc prepare` / `histocsc label`: tiles, registration and IHC labels for a whole cohort.

Per case, in `OUT/<case>/`: the H&E tile grid and store (`grid.csv`, `grid.json`, `tiles.npy`),
`register/<MARKER>/transform.json` (+ overlay), `labels.csv` (grid columns plus
`<M>_fraction`, `<M>_label`), `label_map_<M>.png`, and `qc.json`, written last, which says
whether every marker's registration is trustworthy (`registration_ok`). A marker whose
registration failed, whose aligned tissue overlaps poorly (`min_tissue_overlap`) or whose error
estimate exceeds `max_registration_error_um` keeps its fractions for inspection but all its
labels are -1, and the case is flagged: training must skip cases whose `qc.json` has
`registration_ok: false`. `OUT/summary.json` lists every case; `OUT/cohort.csv` is the cohort
with absolute paths.

Cases run in parallel processes and are resumable: a step whose recorded parameters (configs and
input checksums) match is not redone, and a finished case whose parameters match is skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.cohort import Cohort, CohortCase, read_cohort
from histocsc.errors import DataError, HistocscError, LabelError, RegistrationError
from histocsc.ihc.labels import LabelConfig, MarkerLabels, label_slide, write_label_map
from histocsc.ihc.registration import RegistrationConfig
from histocsc.io import atomic_path, file_checksum, read_json, write_json
from histocsc.wsi.extract import TILES_NPY
from histocsc.wsi.grid import COLUMNS, GRID_CSV, GRID_JSON, TileGrid, TilesConfig

STATE_FILE = "state.json"
QC_FILE = "qc.json"
LABELS_CSV = "labels.csv"


@dataclass
class StageConfigs:
    """The configuration of each stage `prepare` runs."""

    tiles: TilesConfig = field(default_factory=TilesConfig)
    register: RegistrationConfig = field(default_factory=RegistrationConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def dump(self, name: str) -> Any:
        return getattr(self, name).model_dump(mode="json")


# -- small helpers ----------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_state(case_dir: Path) -> dict[str, str]:
    path = case_dir / STATE_FILE
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _record(case_dir: Path, state: dict[str, str], step: str, digest: str) -> None:
    state[step] = digest
    write_json(case_dir / STATE_FILE, state)


def write_labels_csv(path: Path, grid: dict[str, np.ndarray], labels: dict[str, MarkerLabels]):
    """`labels.csv`: every grid column, then `<M>_fraction` (nan: no IHC tissue) and `<M>_label`."""
    header = list(grid) + [c for m in labels for c in (f"{m}_fraction", f"{m}_label")]
    columns = list(grid.values())
    for result in labels.values():
        columns += [result.fraction, result.label]
    n = len(columns[0]) if columns else 0
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            writer.writerow([_cell(col[i]) for col in columns])


def _cell(value: Any) -> str:
    if isinstance(value, (np.floating, float)):
        return "nan" if not np.isfinite(value) else f"{float(value):.6g}"
    return str(int(value))


# -- the adapters onto the tiles and registration stages ---------------------------------------


def make_tiles(he: Path, case_dir: Path, tiles_cfg: TilesConfig) -> None:
    """Tile grid + tile store of the H&E into `case_dir` (grid.csv, grid.json, tiles.npy)."""
    from histocsc.wsi.extract import SlideTask, tile_slides

    task = SlideTask(path=he, out_dir=case_dir)
    (result,) = tile_slides([task], tiles_cfg, save_images=True, workers=1)
    if result.error:
        raise DataError(f"{he}: tiling failed: {result.error}")


def register_marker(he: Path, ihc: Path, out_dir: Path, register_cfg: RegistrationConfig) -> None:
    """Register one IHC (moving) onto the H&E (fixed): writes out_dir/transform.json."""
    from histocsc.ihc.registration import register, save_failure

    try:
        result = register(he, ihc, cfg=register_cfg)
    except HistocscError as exc:
        save_failure(out_dir, exc)  # overlay of what was tried, never a stale one
        raise
    result.save(out_dir)


def load_transform(path: Path) -> tuple[Any, dict[str, Any]]:
    """(H&E -> IHC point map, the registration's error estimate) from transform.json."""
    from histocsc.ihc.transform import Transform

    transform = Transform.load(path)
    return transform.to_moving, dict(transform.error)


# -- one case ----------------------------------------------------------------------------------


def prepare_case(
    case: CohortCase, markers: list[str], out: Path, cfgs: StageConfigs, reuse_existing: bool
) -> dict[str, Any]:
    """Tiles, registration per marker, labels and QC for one case; returns its summary.

    `reuse_existing`: outputs already in the case folder are used even without a matching
    parameter record (the `label` command); otherwise only steps whose parameters match are.
    Raises HistocscError for case-level problems (missing files, tiling failure).
    """
    started = time.perf_counter()
    problems = case.problems(markers)
    if problems:
        raise DataError("; ".join(problems))
    case_dir = out / case.case
    case_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(case_dir)
    he_sum = file_checksum(case.he)
    ihc_paths = {m: p for m in markers if (p := case.ihc[m]) is not None}
    ihc_sums = {m: file_checksum(p) for m, p in ihc_paths.items()}

    tiles_key = _digest("tiles", cfgs.dump("tiles"), he_sum)
    register_keys = {
        m: _digest("register", cfgs.dump("register"), he_sum, ihc_sums[m]) for m in markers
    }
    case_key = _digest("labels", cfgs.dump("label"), tiles_key, register_keys)
    qc_path = case_dir / QC_FILE
    if qc_path.is_file() and not reuse_existing:
        old = read_json(qc_path)
        finished = old.get("status") in ("ok", "flagged") and (case_dir / LABELS_CSV).is_file()
        if old.get("params") == case_key and finished:
            return {**old, "reused": True}

    grid_files = [case_dir / n for n in (GRID_CSV, GRID_JSON, TILES_NPY)]
    if not (reuse_existing and all(p.is_file() for p in grid_files)):
        make_tiles(case.he, case_dir, cfgs.tiles)  # skips a finished grid with the same params
    grid = TileGrid.load(case_dir)
    he_size, he_mpp = (grid.slide_width, grid.slide_height), grid.slide_mpp
    xywh = grid.boxes

    marker_qc: dict[str, dict[str, Any]] = {}
    results: dict[str, MarkerLabels] = {}
    label_cfg = cfgs.label
    for marker in markers:
        reg_dir = case_dir / "register" / marker
        transform_path = reg_dir / "transform.json"
        step = f"register/{marker}"
        qc: dict[str, Any] = {"ihc": str(ihc_paths[marker]), "registration_ok": False}
        try:
            if not (
                transform_path.is_file()
                and (reuse_existing or state.get(step) == register_keys[marker])
            ):
                transform_path.unlink(missing_ok=True)  # never label from a stale transform
                register_marker(case.he, ihc_paths[marker], reg_dir, cfgs.register)
                _record(case_dir, state, step, register_keys[marker])
            he_to_ihc, error = load_transform(transform_path)
            qc["registration_error_um"] = error.get("residual_um_median")
            qc["registration_error_um_p95"] = error.get("residual_um_p95")
            qc["registration_error_blocks"] = error.get("blocks")
            qc["registration_ncc"] = error.get("ncc")
            qc["registration_poor"] = error.get("poor")
            qc["tissue_overlap"] = error.get("tissue_overlap")
            qc["registration_ok"], problem = _registration_ok(error, label_cfg)
            if problem:
                qc["error"] = f"{transform_path}: {problem}"
            marker_cfg = label_cfg.for_marker(marker)
            result = label_slide(xywh, he_mpp, ihc_paths[marker], he_to_ihc, marker_cfg)
        except (RegistrationError, LabelError) as exc:
            qc["registration_ok"] = False
            qc["error"] = str(exc)
            result = _unlabelled(len(xywh))
        if not qc["registration_ok"]:  # keep fractions for inspection, never use the labels
            result.label[:] = -1
        results[marker] = result
        qc.update(_counts(result.label))
        qc["dab_od_threshold"] = getattr(result, "dab_od_threshold", None)
        marker_qc[marker] = qc

    write_labels_csv(case_dir / LABELS_CSV, {c: grid.table[c] for c in COLUMNS}, results)
    _write_label_maps(case.he, case_dir, xywh, he_size, results, label_cfg)
    ok = all(q["registration_ok"] for q in marker_qc.values())
    summary = {
        "case": case.case,
        "split": case.split,
        "status": "ok" if ok else "flagged",
        "registration_ok": ok,
        "tiles": int(len(xywh)),
        "markers": marker_qc,
        "params": case_key,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(qc_path, summary)
    return {**summary, "reused": False}


def _registration_ok(error: dict[str, Any], cfg: LabelConfig) -> tuple[bool, str]:
    """Whether a registration is good enough to label from, and why not.

    Uses the registration's own quality figures (`transform.json` "error"): the overlap of the
    aligned tissue masks (sections of another block overlap poorly), and the residual shift
    measured after alignment (`residual_um_median`), used only when it was measured on at least
    `min_error_blocks` tissue blocks: on a few blocks it is dominated by outliers.
    """
    if error.get("poor"):
        reasons = "; ".join(error.get("poor_reasons") or []) or "flagged poor"
        return False, f"registration QC: {reasons}"
    overlap = error.get("tissue_overlap")
    error_um, blocks = error.get("residual_um_median"), int(error.get("blocks") or 0)
    if not isinstance(overlap, (int, float)) or overlap < cfg.min_tissue_overlap:
        return False, (
            f"aligned tissue overlaps poorly ({overlap} < min_tissue_overlap "
            f"{cfg.min_tissue_overlap}): sections of different blocks, or a failed alignment"
        )
    if blocks >= cfg.min_error_blocks and isinstance(error_um, (int, float)):
        if error_um > cfg.max_registration_error_um:
            return False, (
                f"registration error estimate {error_um:.1f} µm exceeds "
                f"max_registration_error_um {cfg.max_registration_error_um:g}"
            )
    return True, ""


def _unlabelled(n: int) -> MarkerLabels:
    return MarkerLabels(
        fraction=np.full(n, np.nan), tissue=np.zeros(n), label=np.full(n, -1, np.int8)
    )


def _counts(label: np.ndarray) -> dict[str, int]:
    return {
        "positive": int((label == 1).sum()),
        "negative": int((label == 0).sum()),
        "ignored": int((label == -1).sum()),
    }


def _write_label_maps(
    he: Path,
    case_dir: Path,
    xywh: np.ndarray,
    he_size: tuple[int, int],
    results: dict[str, MarkerLabels],
    cfg: LabelConfig,
) -> None:
    from histocsc.wsi.slide import open_slide

    with open_slide(he) as slide:
        mpp = max(slide.mpp, max(he_size) * slide.mpp / cfg.label_map_max_px)
        thumb = slide.thumbnail(mpp)
    scale = thumb.shape[1] / he_size[0]
    for marker, result in results.items():
        write_label_map(case_dir / f"label_map_{marker}.png", thumb, scale, xywh, result.label)


# -- the cohort --------------------------------------------------------------------------------


def _run_one(
    case: CohortCase, markers: list[str], out: Path, cfgs: StageConfigs, reuse: bool
) -> dict[str, Any]:
    """prepare_case, turning any failure into a 'failed' summary so the other cases go on."""
    try:
        return prepare_case(case, markers, out, cfgs, reuse)
    except HistocscError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the cohort
        error = f"case {case.case}: unexpected {type(exc).__name__}: {exc}"
        (out / case.case).mkdir(parents=True, exist_ok=True)
        (out / case.case / "error.txt").write_text(traceback.format_exc())
    result = _failed(case, error)
    if (out / case.case).is_dir():
        write_json(out / case.case / QC_FILE, result)
    return result


def _failed(case: CohortCase, error: str) -> dict[str, Any]:
    return {
        "case": case.case,
        "split": case.split,
        "status": "failed",
        "registration_ok": False,
        "error": error,
        "markers": {},
        "reused": False,
    }


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def run_cohort(
    cohort_path: str | Path,
    out: str | Path,
    cfgs: StageConfigs,
    workers: int = 1,
    reuse_existing: bool = False,
    on_done: Any = None,
) -> list[dict[str, Any]]:
    """Prepare every case of a cohort into `out`; returns per-case summaries in cohort order.

    Writes `out/cohort.csv` (absolute paths) and `out/summary.json`. Raises only for problems
    of the whole cohort (unreadable table, configured marker absent from it).
    """
    cohort = read_cohort(cohort_path)
    markers = cohort.select_markers(cfgs.label.markers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_cohort_copy(cohort, out / "cohort.csv")
    results: dict[str, dict[str, Any]] = {}
    if workers <= 1 or len(cohort.cases) == 1:
        for case in cohort.cases:
            results[case.case] = _run_one(case, markers, out, cfgs, reuse_existing)
            if on_done:
                on_done(results[case.case])
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(cohort.cases)), mp_context=ctx, initializer=_init_worker
        ) as pool:
            futures = {
                pool.submit(_run_one, case, markers, out, cfgs, reuse_existing): case
                for case in cohort.cases
            }
            for future in as_completed(futures):
                case = futures[future]
                try:
                    results[case.case] = future.result()
                except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory)
                    results[case.case] = _failed(case, f"case {case.case}: worker died ({exc})")
                if on_done:
                    on_done(results[case.case])
    ordered = [results[c.case] for c in cohort.cases]
    write_json(out / "summary.json", {"markers": markers, "cases": ordered})
    return ordered


def _write_cohort_copy(cohort: Cohort, path: Path) -> None:
    """The cohort table with absolute paths, so it stays valid inside `out`."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "he", *cohort.markers, "split"])
        for c in cohort.cases:
            ihc = [str(c.ihc[m]) if c.ihc[m] else "" for m in cohort.markers]
            writer.writerow([c.case, str(c.he), *ihc, c.split])


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
) -> list[dict[str, Any]]:
    """Run the cohort with a progress bar, print the summary table; error if a case failed."""
    from rich.console import Console

    from histocsc.progress import progress_bar

    n_cases = len(read_cohort(cohort_path).cases)
    with progress_bar(command, n_cases, unit="cases") as advance:
        results = run_cohort(
            cohort_path, out, cfgs, workers, reuse_existing, on_done=lambda _: advance(1)
        )
    markers = read_json(out / "summary.json")["markers"]
    console = Console()
    console.print(summary_table(results, markers, f"histocsc {command}"))
    flagged = [r["case"] for r in results if r["status"] == "flagged"]
    failed = [r for r in results if r["status"] == "failed"]
    if flagged:
        console.print(
            f"[yellow]flagged (labels of the poorly registered markers set to -1; qc.json "
            f"registration_ok false): {', '.join(flagged)}[/yellow]"
        )
    console.print(f"summary: {out / 'summary.json'}")
    if failed:
        details = "; ".join(r["error"] for r in failed)
        raise DataError(f"{len(failed)} of {len(results)} case(s) failed: {details}")
    return results
