"""`histocsc train`: a tile classifier on a prepared cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors
from histocsc.config import presets

CONFIG_HELP = (
    "YAML config file, or a packaged preset by name from any folder: "
    f"{', '.join(p for p in presets() if p.startswith('train'))} "
    "(`histocsc config show NAME > my.yaml` writes one out to edit)."
)


@app.command("train")
@user_errors
def train_command(
    config: Annotated[
        Path | None, typer.Option("--config", help=CONFIG_HELP)
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
