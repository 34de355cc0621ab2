"""`histocsc register` and `transform-points`: IHC onto H&E alignment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors
from histocsc.cli.options import (
    OverrideSlideMppOpt,
    SlideMppOpt,
)
from histocsc.errors import HistocscError


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
    out: Annotated[Path, typer.Option("--out", help="CSV to write (same format).")],
    transform: Annotated[Path, typer.Argument(help="transform.json from `histocsc register`.")],
    points: Annotated[Path, typer.Argument(help="CSV ',X,Y' of level-0 points.")],
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
