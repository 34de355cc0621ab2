"""`histocsc train`: a tile classifier on a prepared cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histocsc.cli.app import _state, app, user_errors
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
    """Train a tile classifier on a prepared cohort; writes checkpoints, metrics and run.json.

    Ctrl-C or SIGTERM stops it at the next batch, keeping checkpoints/last.ckpt of the last
    complete epoch (exit 130 / 143); without a terminal it logs one line per epoch."""
    from histocsc.config import parse_overrides
    from histocsc.learn.guard import guard_run_dir, requeued
    from histocsc.learn.train import default_run_dir, load_train_config
    from histocsc.progress import on_terminal

    values = parse_overrides(overrides or [])
    if data is not None:
        values["data.root"] = str(data)
    cfg = load_train_config(config, values)
    run_dir = out if out is not None else default_run_dir(cfg, resume)
    guard_run_dir(run_dir, resume, force)
    if resume is None and (hpc := requeued(run_dir)) is not None:
        typer.echo(f"continuing the requeued SLURM job from {hpc}")
    if not _state["debug"]:
        _quiet_lightning()
    batch_log = not on_terminal()
    if batch_log:  # a batch log gets EpochLog's lines, not a redrawn progress bar
        cfg.trainer.progress_bar = False
    result = _train_stoppable(cfg, run_dir, resume, batch_log)
    if result.global_rank != 0:  # one report per run, not one per process
        return
    best = f"{result.best_checkpoint} (val AUROC mean {result.best_score:.3f})"
    typer.echo(f"best checkpoint: {best}")
    for marker, row in result.test.items():
        typer.echo(f"test {marker}: AUROC {row['auroc']:.3f}  AP {row['ap']:.3f}")
    if not result.test:
        typer.secho("note: no test split (no case with split=test, data.test_fraction 0 or too "
                    "few cases): test_metrics.json is empty; evaluate on held-out cases before "
                    "trusting the model", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"run folder: {result.run_dir}")


def _train_stoppable(cfg: Any, run_dir: Path, resume: Path | None, batch_log: bool) -> Any:
    """train() under Ctrl-C / SIGTERM handling (histocsc.learn.stopping): a stop is one line
    and exit 128 + the signal number."""
    from histocsc.learn.epoch_log import EpochLog
    from histocsc.learn.guard import mark_unfinished
    from histocsc.learn.stopping import NAMES, TrainingStopped, stop_on_signals, stop_workers
    from histocsc.learn.train import train

    with stop_on_signals() as stop:
        mark_unfinished(run_dir)
        try:
            return train(cfg, run_dir=run_dir, resume=resume,
                         callbacks=[stop, *([EpochLog()] if batch_log else [])])
        except (TrainingStopped, SystemExit) as exc:
            stop_workers()
            if isinstance(exc, SystemExit) and stop.signum is None:
                raise  # not ours
            signum = stop.signum or 2
            last = run_dir / "checkpoints" / "last.ckpt"
            done = f"end of epoch {stop.epochs} of this run" if stop.epochs else "an earlier run's"
            kept = (f"{last} kept ({done}); continue with --resume {last}" if last.is_file()
                    else "no epoch was complete, so no checkpoint was written")
            typer.secho(f"stopped by {NAMES.get(signum, signum)}: {kept}",
                        fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(128 + int(signum)) from None


def _quiet_lightning() -> None:
    """Lightning's tips, device banners and deprecation notices off (`--debug` keeps them)."""
    import logging
    import warnings

    from lightning.fabric.utilities.warnings import PossibleUserWarning

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PossibleUserWarning):
        warnings.filterwarnings("ignore", category=category)
