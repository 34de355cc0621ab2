"""Tile whole slides: tissue mask, tile grid, overview pictures and (optionally) tile pixels.

Per slide, in `OUT/<slide_stem>/`: `mask.png` (tissue mask at the thumbnail resolution),
`thumbnail.png` (the slide with kept tiles outlined), `grid.csv` + `grid.json` (see
`histocsc.wsi.grid`) and, with `save_images`, `tiles.npy`: uint8 (N, tile_px, tile_px, 3) in grid
row order, readable with `np.load(path, mmap_mode="r")`.

Speed: tiles are read in runs of neighbours by `histocsc.wsi.reader.TileReader` (for Aperio SVS
and generic tiled TIFFs, level-0 tiles decoded directly) and written with pwrite into a `.npy`
created with `np.lib.format.open_memmap`. The grid is cut into bands of rows that worker
processes fill in parallel, each with its own slide handle; so one big slide uses every worker,
and so do many small ones. Every output is written under a temporary name and renamed;
`grid.json` is written last, so a slide counts as finished only when its sidecar exists and its
parameters and slide checksum match the current run.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import math
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from histocsc.cpu import cpu_count
from histocsc.errors import DataError, HistocscError, SlideError
from histocsc.io import atomic_path, file_checksum, read_json
from histocsc.workers import process_pool
from histocsc.wsi.grid import GRID_JSON, TileGrid, TilesConfig, make_grid
from histocsc.wsi.preflight import check_disk, check_tiling, open_with_pixel_size
from histocsc.wsi.reader import close_readers, process_reader
from histocsc.wsi.slide import open_slide
from histocsc.wsi.tissue import tissue_mask

TILES_NPY = "tiles.npy"
MASK_PNG = "mask.png"
THUMB_PNG = "thumbnail.png"
OVERVIEW_MAX_PX = 2048  # long side of thumbnail.png, at most ...
OVERVIEW_MIN_PX = 1024  # ... and at least (unless the slide itself is smaller)
Advance = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class SlideTask:
    """One slide to tile: its path, its output folder, and the pixel size to use when the file
    does not record one."""

    path: Path
    out_dir: Path
    slide_mpp: float | None = None
    override_mpp: float | None = None  # replaces the file's own pixel size when given


@dataclasses.dataclass
class SlideResult:
    """What happened to one slide."""

    path: Path
    out_dir: Path
    n_tiles: int = 0
    skipped: bool = False
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


def plan_tasks(
    slides: list[Path], out: Path, slide_mpp: float | None = None, override: float | None = None
) -> list[SlideTask]:
    """One task per slide, output in `out/<stem>`; two slides with the same stem are an error."""
    seen: dict[str, Path] = {}
    tasks = []
    for path in slides:
        stem = path.stem
        if stem in seen and seen[stem].resolve() != path.resolve():
            raise DataError(f"{path}: same name as {seen[stem]}; both would write {out / stem}")
        if stem in seen:
            continue
        seen[stem] = path
        tasks.append(SlideTask(path, out / stem, slide_mpp, override))
    return tasks


def effective_mpp(task: SlideTask) -> float | None:
    """The slide's own pixel size, else the task's fallback (None when neither exists)."""
    with open_slide(task.path, mpp=task.override_mpp, fallback_mpp=task.slide_mpp) as probe:
        return probe.mpp if probe.has_mpp else None


def is_finished(task: SlideTask, cfg: TilesConfig, save_images: bool) -> bool:
    """True when `task.out_dir` holds outputs of this slide file (same checksum and pixel size)
    made with the same parameters (and holding tile pixels when `save_images`)."""
    meta_path = task.out_dir / GRID_JSON
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path)
        if meta.get("params") != cfg.model_dump(mode="json"):
            return False
        if meta.get("slide_checksum") != file_checksum(task.path):
            return False
        mpp = effective_mpp(task)
        if mpp is None or not math.isclose(meta["slide_mpp"], mpp, rel_tol=1e-9):
            return False
        if not save_images:
            return True
        store = np.load(task.out_dir / TILES_NPY, mmap_mode="r")
        return store.shape == (meta["n_tiles"], cfg.tile_px, cfg.tile_px, 3)
    except (OSError, ValueError, KeyError, TypeError, HistocscError):
        return False


# -- one slide: grid and pictures ----------------------------------------------------------------
def prepare_slide(
    task: SlideTask, cfg: TilesConfig, save_images: bool
) -> tuple[TileGrid, Path | None]:
    """Make the grid, write mask.png and thumbnail.png, and create the empty tile store
    (under a temporary name) when `save_images`. The grid itself is saved by `finish_slide`."""
    task.out_dir.mkdir(parents=True, exist_ok=True)
    (task.out_dir / GRID_JSON).unlink(missing_ok=True)  # not finished until rewritten, last
    for stale in task.out_dir.glob(".tiles.*.tmp.npy"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    checksum = file_checksum(task.path)
    with open_slide(task.path, mpp=task.override_mpp, fallback_mpp=task.slide_mpp) as slide:
        if not slide.has_mpp:
            raise SlideError(
                f"{task.path}: the slide does not record its pixel size; pass it with "
                "--slide-mpp (microns per pixel at full resolution, e.g. 0.5 for 20x, 0.25 for 40x)"
            )
        thumb = slide.thumbnail(cfg.tissue.mpp)
        mask = tissue_mask(thumb, cfg.tissue.mpp, cfg.tissue)
        grid = make_grid(slide, cfg, mask=mask, checksum=checksum)
        # a small slide gets a finer overview picture (cheap: it is small)
        side_um = max(slide.dimensions) * slide.mpp
        overview_mpp = max(slide.mpp, side_um / OVERVIEW_MIN_PX)
        if overview_mpp < cfg.tissue.mpp:
            thumb = slide.thumbnail(overview_mpp)
    with atomic_path(task.out_dir / MASK_PNG) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    with atomic_path(task.out_dir / THUMB_PNG) as tmp:
        Image.fromarray(draw_grid(thumb, grid)).save(tmp, format="PNG", compress_level=3)
    tmp_tiles = None
    if save_images:
        check_disk(task.out_dir, len(grid), grid.tile_px, task.path)
        tmp_tiles = task.out_dir / f".tiles.{uuid.uuid4().hex[:8]}.tmp.npy"
        shape = (len(grid), grid.tile_px, grid.tile_px, 3)
        store = np.lib.format.open_memmap(tmp_tiles, mode="w+", dtype=np.uint8, shape=shape)
        del store
    return grid, tmp_tiles


def draw_grid(thumb: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The thumbnail (at most OVERVIEW_MAX_PX on its long side) with kept tiles outlined."""
    h, w = thumb.shape[:2]
    scale = min(1.0, OVERVIEW_MAX_PX / max(h, w))
    if scale < 1:
        size = (round(w * scale), round(h * scale))
        thumb = cv2.resize(thumb, size, interpolation=cv2.INTER_AREA)
    out = np.ascontiguousarray(thumb)
    sx, sy = out.shape[1] / grid.slide_width, out.shape[0] / grid.slide_height
    for x, y, tw, th in grid.boxes:
        p0 = (int(x * sx), int(y * sy))
        p1 = (max(p0[0] + 1, int((x + tw) * sx) - 1), max(p0[1] + 1, int((y + th) * sy) - 1))
        cv2.rectangle(out, p0, p1, (0, 170, 0), 1)
    return out


def finish_slide(task: SlideTask, grid: TileGrid, tmp_tiles: Path | None) -> None:
    """Rename the filled tile store into place, then save grid.csv and grid.json (last)."""
    if tmp_tiles is not None:
        os.replace(tmp_tiles, task.out_dir / TILES_NPY)
    grid.save(task.out_dir)


def read_chunk(
    path: Path,
    slide_mpp: float | None,
    store_path: Path,
    start: int,
    boxes: np.ndarray,
    tile_px: int,
) -> int:
    """Worker job: read tiles `start .. start+len(boxes)` of a slide into its tile store.

    Runs are written with pwrite at their place in the `.npy` (faster than faulting in the
    pages of a fresh memory map)."""
    header = np.load(store_path, mmap_mode="r").offset
    tile_bytes = tile_px * tile_px * 3
    fd = os.open(store_path, os.O_WRONLY)
    try:
        for i, tiles in process_reader(path, slide_mpp).read_runs(boxes, tile_px):
            _pwrite_all(fd, memoryview(tiles).cast("B"), header + (start + i) * tile_bytes)
    finally:
        os.close(fd)
    return len(boxes)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def chunk_ranges(boxes: np.ndarray, target: int) -> list[tuple[int, int]]:
    """Split tiles (in row order) into ranges of about `target` tiles that end at row ends."""
    n = len(boxes)
    if n == 0:
        return []
    row_ends = list(np.flatnonzero(np.diff(boxes[:, 1]) != 0) + 1) + [n]
    ranges, start = [], 0
    for end in row_ends:
        if end - start >= target:
            ranges.append((start, end))
            start = end
    if start < n:
        ranges.append((start, n))
    return ranges


# -- several slides ------------------------------------------------------------------------------
@contextlib.contextmanager
def _executor(workers: int) -> Iterator[cf.Executor | None]:
    if workers <= 1:
        yield None
        return
    with process_pool(workers) as pool:
        yield pool


def _unordered(
    pool: cf.Executor | None, fn: Callable[..., Any], jobs: dict[Any, tuple]
) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run `fn(*args)` for each `key: args`; yield (key, result, error) as each finishes."""
    if pool is None:
        for key, args in jobs.items():
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported per slide, as from a pool
                yield key, None, exc
            else:
                yield key, result, None
        return
    futures = {pool.submit(fn, *args): key for key, args in jobs.items()}
    try:
        for fut in cf.as_completed(futures):
            exc = fut.exception()
            yield futures[fut], (None if exc else fut.result()), exc
    finally:
        for fut in futures:
            fut.cancel()


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HistocscError) else f"{exc.__class__.__name__}: {exc}"


def tile_slides(
    tasks: list[SlideTask],
    cfg: TilesConfig,
    save_images: bool = False,
    workers: int = 1,
    force: bool = False,
    progress: Callable[[str, int, str], contextlib.AbstractContextManager[Advance]] | None = None,
) -> list[SlideResult]:
    """Tile every slide; finished slides with matching parameters are skipped unless `force`.

    `progress(description, total, unit)` returns a context manager yielding `advance(n)`.
    A failing slide does not stop the others; its error is in its result.
    """
    results = {t: SlideResult(path=t.path, out_dir=t.out_dir) for t in tasks}
    todo = []
    for task in tasks:
        if not force and is_finished(task, cfg, save_images):
            meta = read_json(task.out_dir / GRID_JSON)
            results[task].skipped, results[task].n_tiles = True, int(meta["n_tiles"])
        elif _preflight(task, cfg, results[task]):
            todo.append(task)
    try:
        _tile_todo(todo, cfg, save_images, workers, results, progress)
    finally:  # also on Ctrl-C: no temporary tile stores, no empty folders of failed slides
        for task in todo:
            for stale in task.out_dir.glob(".tiles.*.tmp.npy"):
                stale.unlink(missing_ok=True)
            if task.out_dir.is_dir() and not any(task.out_dir.iterdir()):
                task.out_dir.rmdir()
    return [results[t] for t in tasks]


def _preflight(task: SlideTask, cfg: TilesConfig, result: SlideResult) -> bool:
    """Check the request before reading pixels; False (with the error in `result`) if hopeless."""
    try:
        slide, note = open_with_pixel_size(task.path, task.slide_mpp, task.override_mpp)
        with slide:
            result.warnings += [note] * bool(note) + check_tiling(slide, cfg.tile_px, cfg.mpp)
    except HistocscError as exc:
        result.error = str(exc)
        return False
    return True


def _tile_todo(
    todo: list[SlideTask],
    cfg: TilesConfig,
    save_images: bool,
    workers: int,
    results: dict[SlideTask, SlideResult],
    progress: Callable[[str, int, str], contextlib.AbstractContextManager[Advance]] | None,
) -> None:
    bar = progress or _no_progress
    processes = min(workers, cpu_count()) if todo else 1
    with _executor(processes) as pool:
        prepared: dict[SlideTask, tuple[TileGrid, Path | None]] = {}
        with bar("tissue", len(todo), "slides") as advance:
            jobs = {t: (t, cfg, save_images) for t in todo}
            for task, result, exc in _unordered(pool, prepare_slide, jobs):
                advance(1)
                if exc is not None:
                    results[task].error = _message(exc)
                else:
                    prepared[task] = result
        try:
            _fill_stores(pool, prepared, results, workers, bar)
        finally:
            close_readers()  # those of this process (workers=1); pool workers exit with theirs
            for _, tmp in prepared.values():
                if tmp is not None and tmp.exists():
                    tmp.unlink()


def _fill_stores(
    pool: cf.Executor | None,
    prepared: dict[SlideTask, tuple[TileGrid, Path | None]],
    results: dict[SlideTask, SlideResult],
    workers: int,
    bar: Callable[[str, int, str], contextlib.AbstractContextManager[Advance]],
) -> None:
    total = sum(len(g) for g, tmp in prepared.values() if tmp is not None)
    pending: dict[SlideTask, int] = {}
    jobs: dict[tuple[SlideTask, int], tuple] = {}
    target = int(np.clip(total / (4 * max(1, workers)), 64, 2048))
    for task, (grid, tmp) in prepared.items():
        if tmp is None or len(grid) == 0:
            finish_slide(task, grid, tmp)
            results[task].n_tiles = len(grid)
            continue
        boxes = grid.boxes
        ranges = chunk_ranges(boxes, target)
        pending[task] = len(ranges)
        for a, b in ranges:
            jobs[(task, a)] = (task.path, grid.slide_mpp, tmp, a, boxes[a:b], grid.tile_px)
    if not jobs:
        return
    with bar("tiles", total, "tiles") as advance:
        for (task, _), n_read, exc in _unordered(pool, read_chunk, jobs):
            if exc is not None:
                results[task].error = results[task].error or _message(exc)
            else:
                advance(n_read)
            pending[task] -= 1
            if pending[task] == 0 and results[task].error is None:
                grid, tmp = prepared[task]
                finish_slide(task, grid, tmp)
                results[task].n_tiles = len(grid)


@contextlib.contextmanager
def _no_progress(description: str, total: int, unit: str) -> Iterator[Advance]:
    yield lambda n=1: None
