"""`histocsc export` and `infer`: ONNX models and slide heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import _state, app, note, user_errors
from histocsc.cli.options import (
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
    stem_like: Annotated[
        str | None,
        typer.Option("--stem-like", help="Markers whose union is the stem-like map (comma list, "
                     "or 'none'); default: the model's stem-cell markers (CD133, CD44, ...)."),
    ] = None,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Add an 'embeddings' output (the encoder's "
                           "per-tile embedding) for `infer --features`.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing model files.")] = False,
) -> None:
    """Export a trained model to ONNX (uint8 RGB tiles in, probabilities out), checking parity."""
    from histocsc.errors import ConfigError
    from histocsc.learn.export import PARITY_TOL, export_onnx
    from histocsc.learn.guard import guard_model_files
    from histocsc.learn.model import load_trained
    from histocsc.learn.variant_gate import GateLimits, labelled_run_tiles
    from histocsc.progress import working

    if int8 and calibration is None:
        raise ConfigError("--int8 needs --calibration DIR (tile images or a tiles.npy)")
    variants = [out.with_name(f"{out.stem}.{v}.onnx") for v, on in (("int8", int8),
                                                                     ("fp16", fp16)) if on]
    model, meta = load_trained(run)
    if stem_like is not None:
        meta["stem_like_markers"] = [m.strip() for m in stem_like.split(",")
                                     if m.strip() and stem_like.strip().lower() != "none"]
    guard_model_files([out, *variants], force)
    with working(f"export {out.name}"):
        labelled = labelled_run_tiles(meta, int(meta["tile_px"])) if int8 or fp16 else None
        result = export_onnx(model, meta, out, int8=int8, calibration=calibration, fp16=fp16,
                             check_tiles=check_tiles, labelled=labelled,
                             limits=GateLimits(max_auroc_change, max_prob_diff),
                             embeddings=embeddings)
    for line in result.notes:
        typer.echo(f"note: {line}")
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
    features: Annotated[
        bool, typer.Option("--features", help="Also write each slide's per-tile embeddings "
                           "(features.h5, CLAM / TRIDENT layout); needs export --embeddings.")
    ] = False,
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
    found = find_slides(slides, recursive, notify=note)
    if shard is not None:
        index, count = parse_shard(shard)
        found = take_shard(found, index, count)
        typer.echo(f"shard {index}/{count}: {len(found)} slide(s)")
    sink = None
    if features:
        from histocsc.cli.features import EmbeddingSink

        sink = EmbeddingSink()
    engine = sink.engine(model, device) if sink else Engine(model, device=device)
    typer.echo(engine.describe())
    check_working_mpp(mpp, engine.mpp, model)
    # on the CPU, readers compete with onnxruntime for cores: reading a tile costs ~1/10 of
    # computing it, so a quarter of the cores keep the queue full; a GPU needs them all
    default_workers = cpu_count() if engine.device == "cuda" else max(1, cpu_count() // 4)
    from histocsc.predict.blend import stride_px

    options = InferOptions(batch=batch, workers=workers or default_workers, slide_mpp=slide_mpp,
                           override_slide_mpp=override_slide_mpp,
                           stride_px=stride_px(engine.tile_px, overlap, stride))
    def bar(name: str, total: int) -> object:
        return progress_bar(name, total)

    report = run_slides(engine, found, out, options, say=typer.echo, force=force,
                        progress=sink.progress(bar) if sink else bar)
    if sink:
        for path in sink.write(engine, out, report.done):
            typer.echo(f"wrote {path} (per-tile embeddings: features, coords)")
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
