"""Slide inference with onnxruntime: tissue grid, parallel tile reading ahead of compute, outputs.

Reader threads (each with its own OpenSlide handle; OpenSlide decodes without the GIL) fill a
bounded queue of tile batches in grid order while onnxruntime computes on the previous batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histocsc.cpu import cpu_count
from histocsc.errors import (
    ConfigError,
    HistocscError,
    ModelNotFoundError,
)
from histocsc.io import file_checksum, write_json
from histocsc.learn.metadata import INPUT, OUTPUT, decode_metadata
from histocsc.models import builtin_facts
from histocsc.predict.model_check import check_batch, check_graph
from histocsc.predict.outputs import SUMMARY, Tiles, thumbnail_mpp, write_outputs
from histocsc.predict.report import REPORT, write_report
from histocsc.predict.rerun import MANIFEST, make_manifest, redo_reason, write_manifest
from histocsc.predict.session import open_session
from histocsc.wsi.grid import TileGrid, TilesConfig, make_grid, tile_geometry
from histocsc.wsi.preflight import check_tiling, open_with_pixel_size
from histocsc.wsi.reader import TileReader
from histocsc.wsi.slide import Slide

DEVICES = ("auto", "cpu", "cuda")
ERROR_TXT = "error.txt"
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


def choose_providers(device: str) -> tuple[list[Any], str]:
    """onnxruntime providers for `device` ('auto', 'cpu' or 'cuda') and the device picked."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ConfigError(
            "--device cuda needs onnxruntime-gpu with a working CUDA setup, but this onnxruntime "
            f"{ort.__version__} offers only {', '.join(available)}; install onnxruntime-gpu "
            "(pip install onnxruntime-gpu) or use --device cpu"
        )
    if device == "cuda" or (device == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


class Engine:
    """An onnxruntime session on a histocsc model, with the model's metadata."""

    def __init__(self, model_path: str | Path, device: str = "auto",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"{self.path}: model file not found")
        providers, self.device = choose_providers(device)
        self.threads = threads or cpu_count()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # let reader threads have the cores while compute waits, instead of spinning
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session, self.device, self.fallback_note = open_session(
            self.path, opts, providers, self.device, device)
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = decode_metadata(props, self.path)
        check_graph(self.session, self.path, self.meta["markers"], self.meta["tile_px"])
        self.checksum = file_checksum(self.path)
        self.markers: list[str] = self.meta["markers"]
        self.tile_px: int = self.meta["tile_px"]
        self.mpp: float = self.meta["mpp"]

    def describe(self) -> str:
        """One line naming the device and model, for the CLI."""
        where = "CUDA GPU" if self.device == "cuda" else f"CPU, {self.threads} threads"
        return (f"device: {self.device} ({where}); model {self.path.name}: "
                f"{self.meta['precision']}, markers {', '.join(self.markers)}, "
                f"{self.tile_px} px at {self.mpp:g} mpp"
                + (f"\nnote: {self.fallback_note}" if self.fallback_note else ""))

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities (N, markers) float32 for uint8 tiles (N, tile_px, tile_px, 3)."""
        probs = self.session.run([OUTPUT], {INPUT: tiles})[0]
        check_batch(probs, self.path, self.markers)
        return probs

    def model_info(self) -> dict[str, Any]:
        """What summary.json records about the model."""
        return {"path": str(self.path.resolve()), "checksum": self.checksum,
                **self.meta, "device": self.device, "threads": self.threads,
                **builtin_facts(self.checksum)}


# summary.json's words for where the slide's pixel size came from (Slide.mpp_source)
MPP_SOURCES = {"file": "the slide file", "fallback": "--slide-mpp (the file records none)",
               "given": "--override-slide-mpp (replaces what the file records)"}


@dataclass
class InferOptions:
    """How slides are read and batched."""

    batch: int = 32
    workers: int = 2
    slide_mpp: float | None = None  # used only when the slide records none (--slide-mpp)
    override_slide_mpp: float | None = None  # replaces the slide's own (--override-slide-mpp)
    min_tissue: float | None = None  # keep tiles with at least this tissue fraction
    stride_px: int | None = None  # step between tiles in model px (--overlap/--stride); None: tile


def read_batches(
    slide_path: Path, slide_mpp: float | None, tiles: Tiles, batch: int, workers: int,
) -> Iterator[np.ndarray]:
    """Tile batches (B, tile_px, tile_px, 3) in grid order, read by `workers` threads ahead of
    the consumer through a bounded queue of futures. Each thread has its own fast tile reader
    (the one `histocsc tiles` uses: stored TIFF/SVS tiles decoded directly, runs of neighbours
    read as one region)."""
    local = threading.local()
    readers: list[TileReader] = []
    lock = threading.Lock()
    boxes = np.stack([tiles.x, tiles.y, tiles.w, tiles.h], axis=1).astype(np.int64)

    def reader() -> TileReader:
        if not hasattr(local, "reader"):
            local.reader = TileReader(slide_path, slide_mpp)
            with lock:
                readers.append(local.reader)
        return local.reader

    def read(start: int) -> np.ndarray:
        stop = min(start + batch, len(boxes))
        out = np.empty((stop - start, tiles.tile_px, tiles.tile_px, 3), np.uint8)
        for i, run in reader().read_runs(boxes[start:stop], tiles.tile_px):
            out[i:i + len(run)] = run
        return out

    starts = iter(range(0, len(boxes), batch))
    pending: deque[Future[np.ndarray]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="histocsc-read")
    try:
        for start in starts:
            pending.append(pool.submit(read, start))
            if len(pending) >= 2 * max(1, workers):
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        for r in readers:
            r.close()


def make_tiles(slide: Slide, tile_px: int, mpp: float, min_tissue: float | None,
               stride_px: int | None = None) -> Tiles:
    """Tissue mask and tile grid at the model's mpp and tile size (and stride, when given)."""
    extra = {} if min_tissue is None else {"min_tissue_fraction": min_tissue}
    cfg = TilesConfig(tile_px=tile_px, mpp=mpp, stride_px=stride_px, **extra)
    return tiles_from_grid(make_grid(slide, cfg))


def tiles_from_grid(grid: TileGrid) -> Tiles:
    """Adapt a histocsc.wsi.grid.TileGrid to the outputs' Tiles."""
    size0, stride0 = tile_geometry(grid.slide_mpp, grid.tile_px, grid.mpp, grid.stride_px)

    def col(k: str) -> np.ndarray:
        return np.asarray(grid.table[k])

    return Tiles(
        x=col("x").astype(np.int64), y=col("y").astype(np.int64),
        w=col("w").astype(np.int64), h=col("h").astype(np.int64),
        tissue_fraction=col("tissue_fraction").astype(np.float64),
        slide_width=int(grid.slide_width), slide_height=int(grid.slide_height),
        slide_mpp=float(grid.slide_mpp), mpp=float(grid.mpp), tile_px=int(grid.tile_px),
        step=float(stride0), size=float(size0),
    )


def is_done(out_dir: Path) -> bool:
    """A slide is finished when its summary.json exists (it is written last); whether it was
    made from the same inputs is the run manifest's business (histocsc.predict.rerun)."""
    return (out_dir / SUMMARY).is_file()


def infer_slide(
    engine: Engine, slide_path: str | Path, out_dir: str | Path, options: InferOptions,
    progress: ProgressFactory | None = None, warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the model over the tissue tiles of one slide and write its outputs into `out_dir`."""
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    t0 = time.perf_counter()
    for stale in (out_dir / SUMMARY, out_dir / MANIFEST):  # unfinished until rewritten
        stale.unlink(missing_ok=True)
    slide, note = open_with_pixel_size(slide_path, options.slide_mpp, options.override_slide_mpp)
    with slide:
        warnings = [note] * bool(note) + check_tiling(slide, engine.tile_px, engine.mpp)
        for message in warnings:
            (warn or print)(f"warning: {message}")
        tiles = make_tiles(slide, engine.tile_px, engine.mpp, options.min_tissue,
                           options.stride_px)
        t_mpp = thumbnail_mpp(*slide.dimensions, slide.mpp, engine.mpp)
        thumb = slide.thumbnail(t_mpp)
        slide_info = {"name": slide_path.stem, "path": str(slide_path.resolve()),
                      "width": slide.dimensions[0], "height": slide.dimensions[1],
                      "mpp": slide.mpp, "mpp_source": MPP_SOURCES[slide.mpp_source or "file"],
                      "vendor": slide.vendor,
                      "checksum": file_checksum(slide_path)}
    t1 = time.perf_counter()
    probs = np.zeros((len(tiles.x), len(engine.markers)), np.float32)
    done = 0
    compute = 0.0
    bar = progress(slide_path.name, len(tiles.x)) if progress else contextlib.nullcontext(None)
    with bar as advance:
        for batch in read_batches(slide_path, tiles.slide_mpp, tiles, options.batch,
                                  options.workers):
            c0 = time.perf_counter()
            probs[done:done + len(batch)] = engine.predict(batch)
            compute += time.perf_counter() - c0
            done += len(batch)
            if advance:
                advance(len(batch))
    t2 = time.perf_counter()
    timings = {"tissue_and_grid": t1 - t0, "inference": t2 - t1, "onnxruntime": compute,
               "tiles_per_s": len(tiles.x) / (t2 - t1) if t2 > t1 else 0.0}
    summary = write_outputs(out_dir, tiles, probs, thumb, t_mpp, engine.model_info(), slide_info,
                            timings)
    summary["warnings"] = warnings
    t3 = time.perf_counter()
    timings |= {"outputs": t3 - t2, "total": t3 - t0}
    write_manifest(out_dir, manifest_for(engine, slide_path, slide_info["checksum"],
                                         tiles.slide_mpp, options))
    summary["outputs"].append(REPORT)
    write_report(out_dir, summary, thumb)
    write_json(out_dir / SUMMARY, summary)  # last: its presence marks the slide finished
    return summary


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def shard(slides: list[Path], index: int, count: int) -> list[Path]:
    """A deterministic 1/count of `slides`: every count-th slide by sorted name, from index."""
    ordered = sorted(slides, key=lambda p: (p.name, str(p)))
    return ordered[index::count]


@dataclass
class RunReport:
    """What a multi-slide run did."""

    done: list[Path]
    skipped: list[Path]
    failed: list[tuple[Path, str]]
    tracebacks: dict[Path, str] = field(default_factory=dict)


def manifest_for(engine: Engine, slide_path: Path, checksum: str, slide_mpp: float,
                 options: InferOptions) -> dict[str, Any]:
    """What a slide's outputs are made from (see histocsc.predict.rerun)."""
    params = {"tile_px": engine.tile_px, "mpp": engine.mpp, "min_tissue": options.min_tissue,
              "stride_px": options.stride_px or engine.tile_px}
    return make_manifest(slide_path, checksum, engine.checksum, slide_mpp, params)


def wanted_manifest(engine: Engine, path: Path, options: InferOptions) -> dict[str, Any]:
    """The manifest a run of `path` with these options would write (opens the slide's header)."""
    slide, _ = open_with_pixel_size(path, options.slide_mpp, options.override_slide_mpp)
    with slide:
        mpp = slide.mpp
    return manifest_for(engine, path, file_checksum(path), mpp, options)


def run_slides(
    engine: Engine, slides: list[Path], out: Path, options: InferOptions,
    say: Callable[[str], None] = print, force: bool = False,
    progress: ProgressFactory | None = None,
) -> RunReport:
    """Infer every slide, skipping those finished with the same inputs and going on past
    failures (each failed slide's traceback goes to its folder's error.txt)."""
    report = RunReport([], [], [])
    for n, path in enumerate(slides, 1):
        slide_out = out / path.stem
        head = f"[{n}/{len(slides)}] {path.name}"
        try:
            wanted = wanted_manifest(engine, path, options)
            reason = redo_reason(slide_out, is_done(slide_out), wanted, force)
        except HistocscError as exc:
            say(f"{head}: FAILED: {exc}")
            report.failed.append((path, str(exc)))
            continue
        if reason is None:
            say(f"{head}: already done with the same slide, model and parameters, skipped "
                f"({slide_out / SUMMARY})")
            report.skipped.append(path)
            continue
        if reason:
            say(f"{head}: recomputing: {reason}")
        try:
            summary = infer_slide(engine, path, slide_out, options, progress=progress, warn=say)
        except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a cohort
            message = str(exc) if str(exc) else exc.__class__.__name__
            report.tracebacks[path] = save_error(slide_out, exc)
            say(f"{head}: FAILED: {message} (details: {slide_out / ERROR_TXT})")
            report.failed.append((path, message))
            continue
        t = summary["timings_s"]
        say(f"{head}: {summary['tiles']} tiles in {t['total']:.1f} s "
            f"({t['tiles_per_s']:.0f} tiles/s) -> {slide_out}")
        report.done.append(path)
    return report


def save_error(out_dir: Path, exc: BaseException) -> str:
    """Write the traceback of `exc` to out_dir/error.txt; return it."""
    text = "".join(traceback.format_exception(exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ERROR_TXT).write_text(text)
    return text
