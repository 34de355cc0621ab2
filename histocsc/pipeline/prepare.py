"""`histocsc prepare` / `histocsc label`: tiles, registration and IHC labels for a whole cohort.

Per case, in `OUT/<case>/`: the H&E tile grid and store (`grid.csv`, `grid.json`, `tiles.npy`),
`register/<MARKER>/transform.json` (+ overlay), `labels.csv` (grid columns plus
`<M>_fraction`, `<M>_label`, and with a cell rule `<M>_cells`, `<M>_positive_cells`,
`<M>_hscore`), `label_map_<M>.png`, and `qc.json`, written last, which says
whether every marker's registration is trustworthy (`registration_ok`). A marker whose
registration failed, whose aligned tissue overlaps poorly (`min_tissue_overlap`) or whose error
estimate exceeds the limit for the tiles (`max_registration_error_tile` of the tile side, or
`max_registration_error_um`) keeps its fractions for inspection but all its
labels are -1, and the case is flagged: training must skip cases whose `qc.json` has
`registration_ok: false`. `OUT/summary.json` lists every case; `OUT/cohort.csv` is the cohort
with absolute paths.

Cases run in parallel processes and are resumable: a step whose recorded parameters (configs and
input checksums) match is not redone, and a finished case whose parameters match is skipped.
"""

from __future__ import annotations

import csv
import time
import traceback
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from histocsc.cohort import Cohort, CohortCase, read_cohort
from histocsc.errors import DataError, HistocscError, LabelError, RegistrationError
from histocsc.ihc.labels import LabelConfig, MarkerLabels, label_slide
from histocsc.ihc.registration import RegistrationConfig
from histocsc.io import atomic_path, file_checksum, read_json, write_json
from histocsc.pipeline.case_merge import (
    digest,
    kept_markers,
    marker_key,
    no_ihc,
    read_previous,
    reusable,
)
from histocsc.pipeline.label_files import (
    label_counts,
    unlabelled,
    write_label_maps,
    write_labels_csv,
)
from histocsc.pipeline.stages import load_transform, make_tiles, register_marker, tiling_warnings
from histocsc.workers import process_pool
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
    slide_mpp: float | None = None  # pixel size of slides that record none (--slide-mpp)

    def dump(self, name: str) -> Any:
        return getattr(self, name).model_dump(mode="json")


# -- small helpers ----------------------------------------------------------------------------


def _load_state(case_dir: Path) -> dict[str, str]:
    path = case_dir / STATE_FILE
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _record(case_dir: Path, state: dict[str, str], step: str, digest: str) -> None:
    state[step] = digest
    write_json(case_dir / STATE_FILE, state)


# -- one case ----------------------------------------------------------------------------------


def prepare_case(
    case: CohortCase, markers: list[str], out: Path, cfgs: StageConfigs, reuse_existing: bool,
    force: bool = False,
) -> dict[str, Any]:
    """Tiles, registration per marker, labels and QC for one case; returns its summary.

    `reuse_existing`: outputs already in the case folder are used even without a matching
    parameter record (the `label` command); otherwise only steps whose parameters match are.
    Raises HistocscError for case-level problems (missing files, tiling failure).
    """
    started = time.perf_counter()
    problems = case.problems(markers)
    present = [m for m in markers if case.ihc.get(m) is not None]
    if problems:
        raise DataError("; ".join(problems))
    case_dir = out / case.case
    case_dir.mkdir(parents=True, exist_ok=True)
    state = {} if force else _load_state(case_dir)
    he_mpp = case.slide_mpp("he", cfgs.slide_mpp)
    ihc_mpp = {m: case.slide_mpp(m, cfgs.slide_mpp) for m in present}
    he_sum = file_checksum(case.he)
    ihc_paths = {m: case.ihc[m] for m in present}
    ihc_sums = {m: file_checksum(p) for m, p in ihc_paths.items()}

    tiles_key = digest("tiles", cfgs.dump("tiles"), he_sum, he_mpp)
    # the registration error limit follows the tiles the labels are for
    limit_um = cfgs.label.error_limit_um(cfgs.tiles.tile_px * cfgs.tiles.mpp)
    register_cfg = cfgs.register.model_copy(update={"poor_error_um": limit_um})
    register_keys = {
        m: digest("register", register_cfg.model_dump(mode="json"), he_sum, ihc_sums[m], he_mpp,
                  ihc_mpp[m])
        for m in present
    }
    keys = {m: marker_key(cfgs.label, m, tiles_key, register_keys.get(m)) for m in markers}
    case_key = digest("labels", tiles_key, keys)
    qc_path = case_dir / QC_FILE
    old = {} if force else read_previous(qc_path)
    if not reuse_existing and reusable(old, case_dir, tiles_key, keys):
        return {**old, "reused": True}

    grid_files = [case_dir / n for n in (GRID_CSV, GRID_JSON, TILES_NPY)]
    warnings, upsampling = tiling_warnings(case.he, cfgs.tiles, he_mpp)
    if not (reuse_existing and all(p.is_file() for p in grid_files)):
        # skips a finished grid with the same params
        make_tiles(case.he, case_dir, cfgs.tiles, he_mpp, force)
    grid = TileGrid.load(case_dir)
    he_size = (grid.slide_width, grid.slide_height)
    xywh = grid.boxes
    kept_qc, kept_columns, notes = kept_markers(old, case_dir, tiles_key, markers, len(xywh))

    marker_qc: dict[str, dict[str, Any]] = {}
    results: dict[str, MarkerLabels] = {}
    label_cfg = cfgs.label
    for marker in markers:
        if marker not in present:  # an empty cohort cell: ignored, not negative
            results[marker] = unlabelled(len(xywh))
            marker_qc[marker] = no_ihc(keys[marker], label_counts(results[marker].label))
            (case_dir / f"label_map_{marker}.png").unlink(missing_ok=True)
            continue
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
                register_marker(case.he, ihc_paths[marker], reg_dir, register_cfg, he_mpp,
                                ihc_mpp[marker])
                _record(case_dir, state, step, register_keys[marker])
            he_to_ihc, error, ihc_to_he = load_transform(transform_path)
            qc["registration_error_um"] = error.get("residual_um_median")
            qc["registration_error_um_p95"] = error.get("residual_um_p95")
            qc["registration_error_blocks"] = error.get("blocks")
            qc["registration_ncc"] = error.get("ncc")
            qc["registration_poor"] = error.get("poor")
            qc["tissue_overlap"] = error.get("tissue_overlap")
            qc["registration_confidence"] = error.get("confidence")
            qc["registration_error_limit_um"] = round(limit_um, 2)
            qc["registration_ok"], problem = _registration_ok(error, label_cfg, limit_um)
            if problem:
                qc["error"] = f"{transform_path}: {problem}"
            marker_cfg = label_cfg.for_marker(marker)
            result = label_slide(xywh, grid.slide_mpp, ihc_paths[marker], he_to_ihc, marker_cfg,
                                 ihc_mpp[marker], ihc_to_he, marker)
        except (RegistrationError, LabelError) as exc:
            qc["registration_ok"] = False
            qc["error"] = str(exc)
            result = unlabelled(len(xywh))
        if not qc["registration_ok"]:  # keep fractions for inspection, never use the labels
            result.label[:] = -1
        results[marker] = result
        qc.update(label_counts(result.label))
        qc["dab_od_threshold"] = getattr(result, "dab_od_threshold", None)
        qc["params"] = keys[marker]
        marker_qc[marker] = qc

    write_labels_csv(case_dir / LABELS_CSV, {c: grid.table[c] for c in COLUMNS}, results,
                     kept_columns)
    write_label_maps(case.he, case_dir, xywh, he_size,
                     {m: r for m, r in results.items() if m in present}, label_cfg, he_mpp)
    every = {**kept_qc, **marker_qc}
    if all(q.get("no_ihc") for q in every.values()):
        warnings.append(f"no IHC slide for {', '.join(every)} in the cohort: no labels")
    ok = all(q["registration_ok"] for q in every.values() if not q.get("no_ihc"))
    summary = {
        "case": case.case,
        "split": case.split,
        "status": "ok" if ok else "flagged",
        "registration_ok": ok,
        "tiles": int(len(xywh)),
        "markers": every,
        "warnings": warnings,
        "upsampling": upsampling,  # tiles this many times finer than the H&E's pixels
        "notes": notes,
        "params": case_key,
        "tiles_params": tiles_key,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(qc_path, summary)
    return {**summary, "reused": False}


def _registration_ok(
    error: dict[str, Any], cfg: LabelConfig, limit_um: float | None = None
) -> tuple[bool, str]:
    """Whether a registration is good enough to label from, and why not.

    Uses the registration's own quality figures (`transform.json` "error"): the overlap of the
    aligned tissue masks (sections of another block overlap poorly), and the residual shift
    measured after alignment (`residual_um_median`), used only when it was measured on at least
    `min_error_blocks` tissue blocks: on a few blocks it is dominated by outliers. `limit_um`:
    the error limit for these tiles (default: `cfg.error_limit_um` of 224 px at 0.5 µm/px).
    """
    from histocsc.ihc.registration.qc import judge

    limit = cfg.error_limit_um(112.0) if limit_um is None else limit_um
    poor, why = judge(error, limit)
    if poor:
        return False, f"registration QC: {'; '.join(why) or 'flagged poor'}"
    overlap = error.get("tissue_overlap")
    error_um, blocks = error.get("residual_um_median"), int(error.get("blocks") or 0)
    if not isinstance(overlap, (int, float)) or overlap < cfg.min_tissue_overlap:
        return False, (
            f"aligned tissue overlaps poorly ({overlap} < min_tissue_overlap "
            f"{cfg.min_tissue_overlap}): sections of different blocks, or a failed alignment"
        )
    if blocks >= cfg.min_error_blocks and isinstance(error_um, (int, float)):
        if error_um > limit:
            return False, (
                f"registration error estimate {error_um:.1f} µm exceeds the limit {limit:g} µm "
                "(max_registration_error_um, or max_registration_error_tile x the tile side)"
            )
    return True, ""


# -- the cohort --------------------------------------------------------------------------------


def _run_one(
    case: CohortCase, markers: list[str], out: Path, cfgs: StageConfigs, reuse: bool,
    force: bool = False,
) -> dict[str, Any]:
    """prepare_case, turning any failure into a 'failed' summary so the other cases go on."""
    try:
        return prepare_case(case, markers, out, cfgs, reuse, force)
    except HistocscError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the cohort
        error = f"case {case.case}: unexpected {type(exc).__name__}: {exc}"
        (out / case.case).mkdir(parents=True, exist_ok=True)
        (out / case.case / "error.txt").write_text(traceback.format_exc())
    result = _failed(case, error)
    if (out / case.case).is_dir():
        qc_path = out / case.case / QC_FILE
        kept = {m: q for m, q in (read_previous(qc_path).get("markers") or {}).items()
                if m not in markers}
        if kept:  # the other markers' earlier results stay; this run's markers are unusable
            failed = {"registration_ok": False, "error": error}
            result["markers"] = {**kept, **{m: dict(failed) for m in markers}}
        write_json(qc_path, result)
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
    force: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Prepare every case of a cohort (or of its `shard` (I, N): every N-th case from the I-th)
    into `out`; returns per-case summaries in cohort order. `force` redoes finished steps.

    Writes `out/cohort.csv` (absolute paths) and `out/summary.json` (`summary-I-of-N.json` for a
    shard). Raises only for problems of the whole cohort (unreadable table, configured marker
    absent from it).
    """
    cohort = read_cohort(cohort_path)
    markers = cohort.select_markers(cfgs.label.markers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_cohort_copy(cohort, out / "cohort.csv")
    if shard is not None:
        cohort = replace(cohort, cases=cohort.cases[shard[0]::shard[1]])
    results: dict[str, dict[str, Any]] = {}
    if workers <= 1 or len(cohort.cases) <= 1:
        for case in cohort.cases:
            results[case.case] = _run_one(case, markers, out, cfgs, reuse_existing, force)
            if on_done:
                on_done(results[case.case])
    else:
        try:
            _run_parallel(cohort, markers, out, cfgs, workers, reuse_existing, on_done, results,
                          force)
        except KeyboardInterrupt:  # workers are stopped; drop their half-written tile stores
            for case in cohort.cases:
                for stale in (out / case.case).glob(".tiles.*.tmp.npy"):
                    stale.unlink(missing_ok=True)
            raise
    ordered = [results[c.case] for c in cohort.cases]
    write_json(summary_path(out, shard), {"markers": markers, "cases": ordered})
    return ordered


def summary_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """`out/summary.json`, or `out/summary-I-of-N.json` for one shard of the cohort."""
    return out / ("summary.json" if shard is None else f"summary-{shard[0]}-of-{shard[1]}.json")


def _run_parallel(
    cohort: Cohort,
    markers: list[str],
    out: Path,
    cfgs: StageConfigs,
    workers: int,
    reuse_existing: bool,
    on_done: Any,
    results: dict[str, dict[str, Any]],
    force: bool = False,
) -> None:
    """The cases in worker processes; Ctrl-C cancels the queued cases and stops the rest."""
    with process_pool(min(workers, len(cohort.cases)), _init_worker) as pool:
        futures = {
            pool.submit(_run_one, case, markers, out, cfgs, reuse_existing, force): case
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


def _write_cohort_copy(cohort: Cohort, path: Path) -> None:
    """The cohort table with absolute paths, so it stays valid inside `out`."""
    sizes = ["*", "he", *cohort.markers]
    size_columns = {"*": "mpp", "he": "he_mpp", **{m: f"{m}_mpp" for m in cohort.markers}}
    sizes = [k for k in sizes if any(k in c.mpp for c in cohort.cases)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "he", *cohort.markers, "split", "patient",
                         *(size_columns[k] for k in sizes)])
        for c in cohort.cases:
            ihc = [str(c.ihc[m]) if c.ihc[m] else "" for m in cohort.markers]
            writer.writerow([c.case, str(c.he), *ihc, c.split, c.patient,
                             *(c.mpp.get(k, "") for k in sizes)])
