"""Training and export never replace earlier results silently: an existing run or model is
refused unless the user asks to continue it (`--resume`) or to replace it (`--force`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from histocsc.errors import ConfigError

RUN_ITEMS = ("checkpoints", "logs", "tb", "run.json", "test_metrics.json", "config.yaml")


def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a training run (run.json or a checkpoint)."""
    return (run_dir / "run.json").is_file() or any((run_dir / "checkpoints").glob("*.ckpt"))


def guard_run_dir(run_dir: Path, resume: Path | None, force: bool) -> None:
    """Refuse to train into an existing run unless resuming it or forced; when forced, remove
    the old run's files first so that nothing of it mixes with the new one."""
    if resume is not None or not holds_run(run_dir):
        return
    if not force:
        raise ConfigError(
            f"{run_dir}: already holds a training run; use --resume "
            f"{run_dir / 'checkpoints' / 'last.ckpt'} to continue it, --force to replace it, "
            "or another --out")
    for name in RUN_ITEMS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def guard_model_files(paths: list[Path], force: bool) -> None:
    """Refuse to export over existing model files unless forced."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]}: a model is already there; use --force to replace "
                          "it, or another --out")
