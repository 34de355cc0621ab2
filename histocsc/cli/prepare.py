"""`histocsc label` and `prepare`: a cohort's tiles, registrations and labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histocsc.cli.app import app, user_errors
from histocsc.cli.options import (
    ForceOpt,
    ShardOpt,
    SlideMppOpt,
)

ConfigOpt = Annotated[
    Path | None, typer.Option(help="Stage YAML, as in configs/ (default: built-in).")
]
MarkersOpt = Annotated[str | None, typer.Option(help="Comma-separated markers (default: all).")]
CohortOpt = Annotated[Path, typer.Option("--cohort", help="cohort.csv (case,he,<M>...,split).")]
PreparedOpt = Annotated[Path, typer.Option("--out", help="Prepared-cohort folder (one per case).")]
CaseWorkersOpt = Annotated[int, typer.Option(min=1, help="Parallel case processes.")]


MppOpt = Annotated[float | None, typer.Option(
    "--mpp", help="Tile resolution, µm/px [0.5] (as `tiles --mpp`; see docs/researcher.md on "
    "choosing it).")]
TilePxOpt = Annotated[int | None, typer.Option("--tile-px", help="Tile side in pixels [224].")]


def _stage_configs(
    tiles_config: Path | None,
    register_config: Path | None,
    label_config: Path | None,
    markers: str | None,
    tiles_overrides: dict[str, Any] | None = None,
) -> Any:
    """The tiles / register / label configurations of `label` and `prepare`."""
    from histocsc.config import load_config
    from histocsc.ihc.labels import LabelConfig
    from histocsc.ihc.registration import RegistrationConfig
    from histocsc.pipeline.prepare import StageConfigs
    from histocsc.wsi.grid import TilesConfig

    names = [m.strip() for m in markers.split(",") if m.strip()] if markers else None
    return StageConfigs(
        tiles=load_config(TilesConfig, tiles_config, tiles_overrides),
        register=load_config(RegistrationConfig, register_config),
        label=load_config(LabelConfig, label_config, {"markers": names}),
    )


@app.command()
@user_errors
def label(
    cohort: CohortOpt, out: PreparedOpt, config: ConfigOpt = None, tiles_config: ConfigOpt = None,
    register_config: ConfigOpt = None, markers: MarkersOpt = None, workers: CaseWorkersOpt = 1,
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
    cohort: CohortOpt,
    out: PreparedOpt,
    tiles_config: ConfigOpt = None,
    register_config: ConfigOpt = None,
    label_config: ConfigOpt = None,
    markers: MarkersOpt = None,
    mpp: MppOpt = None,
    tile_px: TilePxOpt = None,
    workers: CaseWorkersOpt = 2,
    slide_mpp: SlideMppOpt = None,
    force: ForceOpt = False,
    shard: ShardOpt = None,
) -> None:
    """Tiles, IHC registration and labels for every case (parallel, resumable), with a summary.

    Slides that record no pixel size take it from the cohort's `mpp`, `he_mpp` or
    `<MARKER>_mpp` column, else from --slide-mpp. A marker cell left empty means that case has
    no IHC for it: its labels are -1 (ignored). --markers prepares only some markers and keeps
    the others' earlier results."""
    from histocsc.pipeline.prepare_report import run_and_report
    from histocsc.predict.engine import parse_shard

    cfgs = _stage_configs(tiles_config, register_config, label_config, markers,
                          {"mpp": mpp, "tile_px": tile_px})
    cfgs.slide_mpp = slide_mpp
    part = parse_shard(shard) if shard is not None else None
    run_and_report(cohort, out, cfgs, workers, reuse_existing=False, command="prepare",
                   force=force, shard=part)
