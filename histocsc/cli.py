"""The `histocsc` command: one sub-command per stage, plus `demo`."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from histocsc import __version__
from histocsc.cli_options import (
    ForceOpt,
    OverrideSlideMppOpt,
    OverwriteOpt,
    RecursiveOpt,
    ShardOpt,
    SlideMppOpt,
    SlidesArg,
    check_working_mpp,
    force_or_overwrite,
)
from histocsc.errors import HistocscError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

app = typer.Typer(
    name="histocsc",
    help="Find stem-like (CD133 / CD44 positive) tumour regions on H&E whole-slide images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Print a HistocscError as one line and exit 1; full traceback only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HistocscError as exc:
            if _state["debug"]:
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"histocsc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """histocsc: tiles, IHC labels, training, ONNX export and heatmaps for CSC markers."""
    _state["debug"] = debug


PathArg = Annotated[Path, typer.Argument(help="A path.")]

# --- tiles command ---
@app.command()
@user_errors
def tiles(
    slides: SlidesArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder a slide).")],
    mpp: Annotated[float | None, typer.Option(help="Tile resolution, µm/px [0.5].")] = None,
    tile_px: Annotated[int | None, typer.Option(help="Tile side in pixels [224].")] = None,
    save_images: Annotated[
        bool, typer.Option("--save-images", help="Also store tile pixels in tiles.npy.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Parallel processes.")] = 1,
    config: Annotated[
        Path | None, typer.Option(help="YAML config (default: built-in, see configs/tiles.yaml).")
    ] = None,
    slide_mpp: SlideMppOpt = None,
    override_slide_mpp: OverrideSlideMppOpt = None,
    force: ForceOpt = False,
    recursive: RecursiveOpt = False,
) -> None:
    """Find tissue, lay a tile grid over it, write mask/thumbnail/grid (and tile pixels)."""
    from histocsc.config import load_config
    from histocsc.errors import SlideError
    from histocsc.progress import progress_bar
    from histocsc.wsi.discover import find_slides
    from histocsc.wsi.extract import plan_tasks, tile_slides
    from histocsc.wsi.grid import TilesConfig

    cfg = load_config(TilesConfig, config, {"mpp": mpp, "tile_px": tile_px})
    tasks = plan_tasks(find_slides(slides, recursive), out, slide_mpp, override_slide_mpp)
    results = tile_slides(tasks, cfg, save_images, workers, force, progress=progress_bar)
    failed = [r for r in results if r.error]
    for r in results:
        for message in r.warnings:
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        if not r.error:
            state = "skipped (already done)" if r.skipped else f"{r.n_tiles} tiles"
            typer.echo(f"{r.path.name}: {state} -> {r.out_dir}")
    if failed:
        if len(failed) == 1 and len(results) == 1:
            raise SlideError(failed[0].error or "")
        for r in failed:
            typer.secho(f"error: {r.error}", fg=typer.colors.RED, err=True)
        raise SlideError(f"{len(failed)} of {len(results)} slides failed (see above)")


# --- phantom command ---


@app.command()
@user_errors
def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder (one sub-folder per case).")],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = 5,
    size_px: Annotated[int, typer.Option("--size-px", help="Slide width = height, px.")] = 8192,
    slide_mpp: Annotated[
        float, typer.Option("--slide-mpp", help="Pixel size the slides record, µm/px.")
    ] = 0.5,
    markers: Annotated[str, typer.Option("--markers", help="Comma-separated IHC markers.")] = (
        "CD133,CD44"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    fill_frame: Annotated[
        bool, typer.Option("--fill-frame", help="Tissue fills the whole frame (no outline).")
    ] = False,
) -> None:
    """Write synthetic H&E + IHC slide pairs with known truth, and a cohort.csv."""
    from histocsc.progress import progress_bar
    from histocsc.synthetic.generate import make_cohort, tiles_per_case

    names = [m.strip() for m in markers.split(",") if m.strip()]
    total = cases * tiles_per_case(size_px, len(names))
    with progress_bar("phantom", total) as advance:
        csv_path = make_cohort(out, cases, size_px, slide_mpp, names, seed, advance, fill_frame)
    typer.echo(f"wrote {cases} case(s) and {csv_path}")


# --- register / transform-points commands ---


@app.command("register")
@user_errors
def register_command(
    fixed: Annotated[Path, typer.Argument(help="Fixed slide (the H&E).")],
    moving: Annotated[Path, typer.Argument(help="Moving slide (the IHC section).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for transform.json + overlay.png.")],
    slide_mpp: SlideMppOpt = None,
    override_slide_mpp: OverrideSlideMppOpt = None,
    mpp_fixed: Annotated[
        float | None, typer.Option("--mpp-fixed", hidden=True, help="Deprecated.")
    ] = None,
    mpp_moving: Annotated[
        float | None, typer.Option("--mpp-moving", hidden=True, help="Deprecated.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML (see configs/register.yaml).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: KEY=VALUE.")
    ] = None,
) -> None:
    """Align an IHC section (moving) to its H&E (fixed); writes transform.json and overlay.png."""
    from histocsc.config import load_config, parse_overrides
    from histocsc.errors import HistocscError
    from histocsc.ihc.registration import RegistrationConfig, register, save_failure
    from histocsc.wsi.preflight import effective_slide_mpp

    cfg = load_config(RegistrationConfig, config, parse_overrides(set_ or []))
    try:
        sizes = []
        for path, old in ((fixed, mpp_fixed), (moving, mpp_moving)):
            if old is not None:
                typer.secho("warning: --mpp-fixed / --mpp-moving are deprecated; use --slide-mpp "
                            "(or --override-slide-mpp)", fg=typer.colors.YELLOW, err=True)
            size, note = effective_slide_mpp(path, slide_mpp, override_slide_mpp)
            if note:
                typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
            sizes.append(old if old is not None else size)
        result = register(fixed, moving, sizes[0], sizes[1], cfg,
                          mpp_options=("--slide-mpp", "--slide-mpp"))
    except HistocscError as exc:
        save_failure(out, exc)  # no stale transform or overlay of an earlier run
        raise
    path = result.save(out)
    err = result.error
    poor = f", POOR: {'; '.join(err['poor_reasons'])} (check the overlay)" if result.poor else ""
    typer.echo(
        f"wrote {path} and {out / 'overlay.png'} (working {result.transform.working_mpp:g} µm/px, "
        f"NCC {err['ncc']:.3f}, residual ~{err['residual_um_median']} µm median{poor})"
    )


@app.command("transform-points")
@user_errors
def transform_points_command(
    transform: Annotated[Path, typer.Argument(help="transform.json from `histocsc register`.")],
    points: Annotated[Path, typer.Argument(help="CSV ',X,Y' of level-0 points.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write (same format).")],
    inverse: Annotated[
        bool, typer.Option("--inverse", help="Map fixed -> moving (default moving -> fixed).")
    ] = False,
) -> None:
    """Map landmark points from the moving slide to the fixed one (or back with --inverse)."""
    from histocsc.ihc.transform import Transform, read_points_csv, write_points_csv

    tf = Transform.load(transform)
    index, pts = read_points_csv(points)
    mapped = tf.to_moving(pts) if inverse else tf.to_fixed(pts)
    write_points_csv(out, index, mapped)
    direction = "fixed -> moving" if inverse else "moving -> fixed"
    typer.echo(f"wrote {out} ({len(index)} points, {direction})")

# --- label / prepare commands ---
ConfigOpt = Annotated[
    Path | None, typer.Option(help="Stage YAML, as in configs/ (default: built-in).")
]
MarkersOpt = Annotated[str | None, typer.Option(help="Comma-separated markers (default: all).")]


def _stage_configs(
    tiles_config: Path | None,
    register_config: Path | None,
    label_config: Path | None,
    markers: str | None,
) -> Any:
    """The tiles / register / label configurations of `label` and `prepare`."""
    from histocsc.config import load_config
    from histocsc.ihc.labels import LabelConfig
    from histocsc.ihc.registration import RegistrationConfig
    from histocsc.pipeline.prepare import StageConfigs
    from histocsc.wsi.grid import TilesConfig

    names = [m.strip() for m in markers.split(",") if m.strip()] if markers else None
    return StageConfigs(
        tiles=load_config(TilesConfig, tiles_config),
        register=load_config(RegistrationConfig, register_config),
        label=load_config(LabelConfig, label_config, {"markers": names}),
    )


@app.command()
@user_errors
def label(
    cohort: Annotated[Path, typer.Option("--cohort", help="cohort.csv (case,he,<M>...,split).")],
    out: Annotated[Path, typer.Option("--out", help="Prepared-cohort folder (one per case).")],
    config: ConfigOpt = None,
    tiles_config: ConfigOpt = None,
    register_config: ConfigOpt = None,
    markers: MarkersOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Parallel case processes.")] = 1,
    slide_mpp: SlideMppOpt = None,
) -> None:
    """Per-tile IHC labels (<M>_fraction, <M>_label) into OUT/<case>/labels.csv.

    Uses the tiles and registrations already in OUT/<case>/ and makes the missing ones.
    """
    from histocsc.pipeline.prepare_report import run_and_report

    cfgs = _stage_configs(tiles_config, register_config, config, markers)
    cfgs.slide_mpp = slide_mpp
    run_and_report(cohort, out, cfgs, workers, reuse_existing=True, command="label")


@app.command()
@user_errors
def prepare(
    cohort: Annotated[Path, typer.Option("--cohort", help="cohort.csv (case,he,<M>...,split).")],
    out: Annotated[Path, typer.Option("--out", help="Prepared-cohort folder (one per case).")],
    tiles_config: ConfigOpt = None,
    register_config: ConfigOpt = None,
    label_config: ConfigOpt = None,
    markers: MarkersOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Parallel case processes.")] = 2,
    slide_mpp: SlideMppOpt = None,
    force: ForceOpt = False,
    shard: ShardOpt = None,
) -> None:
    """Tiles, IHC registration and labels for every case (parallel, resumable), with a summary.

    Slides that record no pixel size take it from the cohort's `mpp`, `he_mpp` or
    `<MARKER>_mpp` column, else from --slide-mpp."""
    from histocsc.pipeline.prepare_report import run_and_report
    from histocsc.predict.engine import parse_shard

    cfgs = _stage_configs(tiles_config, register_config, label_config, markers)
    cfgs.slide_mpp = slide_mpp
    part = parse_shard(shard) if shard is not None else None
    run_and_report(cohort, out, cfgs, workers, reuse_existing=False, command="prepare",
                   force=force, shard=part)


# --- train command ---
@app.command("train")
@user_errors
def train_command(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config (see configs/train.yaml).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set trainer.max_epochs=5."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Prepared cohort folder (data.root).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder to write.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Checkpoint to continue from (last.ckpt).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the run already in --out.")
    ] = False,
) -> None:
    """Train a tile classifier on a prepared cohort; writes checkpoints, metrics and run.json."""
    from histocsc.config import parse_overrides
    from histocsc.learn.guard import guard_run_dir
    from histocsc.learn.train import default_run_dir, load_train_config, train

    values = parse_overrides(overrides or [])
    if data is not None:
        values["data.root"] = str(data)
    cfg = load_train_config(config, values)
    guard_run_dir(out if out is not None else default_run_dir(cfg, resume), resume, force)
    result = train(cfg, run_dir=out, resume=resume)
    if result.global_rank != 0:  # one report per run, not one per process
        return
    best = f"{result.best_checkpoint} (val AUROC mean {result.best_score:.3f})"
    typer.echo(f"best checkpoint: {best}")
    for marker, row in result.test.items():
        typer.echo(f"test {marker}: AUROC {row['auroc']:.3f}  AP {row['ap']:.3f}")
    typer.echo(f"run folder: {result.run_dir}")


# --- export / infer commands ---


@app.command("export")
@user_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="Training run folder or .ckpt file.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write (fp32).")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write <out>.int8.onnx.")] = False,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Folder of tile images or a tiles.npy (int8, parity)."),
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write <out>.fp16.onnx.")] = False,
    check_tiles: Annotated[
        Path | None, typer.Option("--check-tiles", help="Tiles for the parity check.")
    ] = None,
    triton_repo: Annotated[
        Path | None, typer.Option("--triton-repo", help="Also write a Triton model repository.")
    ] = None,
    max_auroc_change: Annotated[
        float, typer.Option(help="int8/fp16 gate on labelled tiles: largest AUROC change.")
    ] = 0.01,
    max_prob_diff: Annotated[
        float, typer.Option(help="int8/fp16 gate without labels: largest probability change.")
    ] = 0.05,
    force: Annotated[bool, typer.Option("--force", help="Replace existing model files.")] = False,
) -> None:
    """Export a trained model to ONNX (uint8 RGB tiles in, probabilities out), checking parity."""
    from histocsc.errors import ConfigError
    from histocsc.learn.export import PARITY_TOL, export_onnx
    from histocsc.learn.guard import guard_model_files
    from histocsc.learn.model import load_trained
    from histocsc.learn.variant_gate import GateLimits, labelled_run_tiles

    if int8 and calibration is None:
        raise ConfigError("--int8 needs --calibration DIR (tile images or a tiles.npy)")
    variants = [out.with_name(f"{out.stem}.{v}.onnx") for v, on in (("int8", int8),
                                                                     ("fp16", fp16)) if on]
    model, meta = load_trained(run)
    guard_model_files([out, *variants], force)
    labelled = labelled_run_tiles(meta, int(meta["tile_px"])) if int8 or fp16 else None
    result = export_onnx(model, meta, out, int8=int8, calibration=calibration, fp16=fp16,
                         check_tiles=check_tiles, labelled=labelled,
                         limits=GateLimits(max_auroc_change, max_prob_diff))
    for note in result.notes:
        typer.echo(f"note: {note}")
    for line in result.gates:
        typer.echo(f"gate passed: {line}")
    typer.echo(f"wrote {result.fp32} (fp32, {result.exporter} exporter; max |ONNX - PyTorch| = "
               f"{result.max_abs_diff:.2e} <= {PARITY_TOL:g})")
    if result.int8:
        typer.echo(f"wrote {result.int8} (int8 QDQ; max |int8 - PyTorch| = "
                   f"{result.int8_max_abs_diff:.2e})")
    if result.fp16:
        typer.echo(f"wrote {result.fp16} (fp16; max |fp16 - PyTorch| = "
                   f"{result.fp16_max_abs_diff:.2e})")
    if triton_repo is not None:
        from histocsc.learn.triton_repo import write_triton_repo

        typer.echo(f"wrote {write_triton_repo(result.fp32, triton_repo)} (Triton / KServe model "
                   "repository: config.pbtxt, 1/model.onnx)")


@app.command("infer")
@user_errors
def infer_command(
    slides: SlidesArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder a slide).")],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="ONNX model from `histocsc export` (default: the built-in "
                     "phantom-trained demonstration model, research use only)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Tiles per batch.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, help="Slide-reading threads (default: cores/4 on CPU, all on GPU)."
        ),
    ] = None,
    slide_mpp: SlideMppOpt = None,
    override_slide_mpp: OverrideSlideMppOpt = None,
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", help="Working resolution (µm/px); must be the model's, if given."),
    ] = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    recursive: RecursiveOpt = False,
    overlap: Annotated[
        float | None, typer.Option("--overlap", help="Tile overlap 0 <= F < 1 (e.g. 0.5): scores "
                                   "blended at the stride (finer heatmap, ~1/(1-F)^2 tiles).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Step between tiles in model px (vs --overlap).")
    ] = None,
) -> None:
    """Heatmaps, scores and QuPath tiles of stem-like regions for each slide."""
    from histocsc.predict.engine import Engine, InferOptions, cpu_count, parse_shard, run_slides
    from histocsc.predict.engine import shard as take_shard
    from histocsc.progress import progress_bar
    from histocsc.wsi.discover import find_slides

    force = force_or_overwrite(force, overwrite)
    if model is None:
        from histocsc.models import NOTICE, builtin_model_path

        model = builtin_model_path()
        typer.secho(f"using the built-in model {model.name} ({NOTICE}); "
                    "give --model for your own", fg=typer.colors.YELLOW)
    found = find_slides(slides, recursive)
    if shard is not None:
        index, count = parse_shard(shard)
        found = take_shard(found, index, count)
        typer.echo(f"shard {index}/{count}: {len(found)} slide(s)")
    engine = Engine(model, device=device)
    typer.echo(engine.describe())
    check_working_mpp(mpp, engine.mpp, model)
    # on the CPU, readers compete with onnxruntime for cores: reading a tile costs ~1/10 of
    # computing it, so a quarter of the cores keep the queue full; a GPU needs them all
    default_workers = cpu_count() if engine.device == "cuda" else max(1, cpu_count() // 4)
    from histocsc.predict.blend import stride_px

    options = InferOptions(batch=batch, workers=workers or default_workers, slide_mpp=slide_mpp,
                           override_slide_mpp=override_slide_mpp,
                           stride_px=stride_px(engine.tile_px, overlap, stride))
    report = run_slides(engine, found, out, options, say=typer.echo, force=force,
                        progress=lambda name, total: progress_bar(name, total))
    typer.echo(f"{len(report.done)} done, {len(report.skipped)} skipped (already done), "
               f"{len(report.failed)} failed")
    if len(found) > 1 or any(p.is_dir() for p in slides):
        from histocsc.predict.cohort_report import write_cohort_summary

        table, page = write_cohort_summary(out, found, report.failed)
        typer.echo(f"cohort: {table} and {page}")
    elif report.done:
        typer.echo(f"report: {out / report.done[0].stem / 'report.html'}")
    for path, message in report.failed:
        where = "" if str(path) in message else f"{path}: "
        typer.secho(f"failed: {where}{message}", fg=typer.colors.RED, err=True)
        if _state["debug"] and path in report.tracebacks:
            typer.echo(report.tracebacks[path], err=True)
    if report.failed:
        raise typer.Exit(1)


# --- serve command ---


@app.command()
@user_errors
def serve(
    model: Annotated[Path, typer.Option("--model", help="ONNX model from `histocsc export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    slides_root: Annotated[
        Path | None, typer.Option(help="Folder that slide-job paths must lie inside.")
    ] = None,
    data: Annotated[Path, typer.Option(help="Folder for job state and outputs.")] = Path(
        "histocsc-serve"),
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the key every call but health needs.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: tiles per run.")] = 64,
    max_queue_delay_ms: Annotated[
        float, typer.Option(help="Dynamic batching: longest wait for a fuller batch.")
    ] = 5.0,
    max_tiles_per_request: Annotated[int, typer.Option(help="Tiles in one request.")] = 256,
    max_upload_mb: Annotated[float, typer.Option(help="Largest slide upload, MiB.")] = 4096.0,
    max_queued_jobs: Annotated[int, typer.Option(help="Jobs queued or running before 429.")] = 16,
    model_name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = "histocsc",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Serve the model over HTTP: Open Inference Protocol (KServe v2) tiles and slide jobs."""
    from histocsc.serve.app import run_server
    from histocsc.serve.service import ServeSettings

    run_server(ServeSettings(
        model=model, host=host, port=port, slides_root=slides_root, data=data,
        api_key_file=api_key_file, max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms,
        max_tiles_per_request=max_tiles_per_request, max_upload_mb=max_upload_mb,
        max_queued_jobs=max_queued_jobs, model_name=model_name, device=device))


# --- evaluate command (issue 12) ---


@app.command("evaluate")
@user_errors
def evaluate_command(
    pred_dir: Annotated[Path, typer.Argument(help="One slide's folder of `histocsc infer`.")],
    truth: Annotated[Path, typer.Option("--truth", help="Phantom case folder, QuPath GeoJSON, "
                                        "or a prepared case folder (IHC labels).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (default PRED_DIR/evaluation).")
    ] = None,
) -> None:
    """Compare heatmaps with truth: AUROC, AP, Dice, IoU, ECE per marker, and pictures."""
    from histocsc.evaluate.metrics import evaluate

    out = out if out is not None else pred_dir / "evaluation"
    result = evaluate(pred_dir, truth, out)
    for marker, row in result["markers"].items():
        tile, pixel = row["tile"], row["pixel"]
        auroc = "n/a" if tile["auroc"] is None else f"{tile['auroc']:.3f}"
        ece = "n/a" if tile["ece"] is None else f"{tile['ece']:.3f}"
        typer.echo(f"{marker}: cell Dice {tile['dice']:.3f} IoU {tile['iou']:.3f} AUROC {auroc} "
                   f"ECE {ece}; pixel Dice {pixel['dice']:.3f} IoU {pixel['iou']:.3f} "
                   f"(threshold {row['threshold']:.2f}, {tile['cells']} cells)")
    typer.echo(f"wrote {out / 'evaluation.json'} ({result['truth']['kind']} truth)")


# --- demo command ---


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = (
        Path("demo-output")
    ),
    cases: Annotated[int, typer.Option(min=3, help="Phantom cases (at least 3).")] = 5,
    size_px: Annotated[int, typer.Option(help="Phantom slide side in px (at 1 µm/px).")] = 2560,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the whole pipeline on built-in phantom slides and check the heatmaps against truth."""
    from histocsc.pipeline.demo import run_demo

    summary = run_demo(out, cases=cases, size_px=size_px, seed=seed, epochs=epochs,
                       say=typer.echo)
    typer.echo("")
    typer.echo(f"test-case AUROC per marker: {summary['test_auroc']}")
    typer.echo(f"test-case ECE per marker (before -> after calibration): "
               f"{summary['test_ece']}")
    typer.echo(f"heatmap Dice vs phantom truth (overlap {summary['overlap']:g}), tile level: "
               f"{summary['heatmap_dice_vs_truth']}; pixel level: "
               f"{summary['pixel_dice_vs_truth']}")
    typer.echo(f"timings (s): {summary['timings_s']}")
    for name in summary["outputs"]["heatmaps"]:
        typer.echo(f"look at: {name}/ (heatmap_*.png, tiles.geojson for QuPath)")
    typer.echo(f"summary: {out / 'demo_summary.json'}")
    for page in summary["outputs"]["reports"]:
        typer.echo(f"open the report in a browser: {page}")


def run() -> None:
    """Entry point used by `python -m histocsc`."""
    app(prog_name="histocsc")


if __name__ == "__main__":
    sys.exit(run())
