"""Training and export never replace earlier results silently: an existing run or model is
refused unless the user asks to continue it (`--resume`) or to replace it (`--force`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from histocsc.errors import ConfigError

RUN_ITEMS = ("checkpoints", "logs", "tb", "run.json", "test_metrics.json", "config.yaml")
FINISHED = "run.json"  # written last: a run folder without it was stopped before it finished


def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a training run, finished or not (run.json, a checkpoint, or
    the logs of a fit that started)."""
    return ((run_dir / FINISHED).is_file() or any((run_dir / "checkpoints").glob("*.ckpt"))
            or (run_dir / "logs" / "metrics.csv").is_file() or any(_hpc(run_dir)))


def _hpc(run_dir: Path) -> list[Path]:
    """Lightning's SLURM requeue checkpoints (hpc_ckpt_N.ckpt) in the run folder."""
    return sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def requeued(run_dir: Path) -> Path | None:
    """The checkpoint a requeued SLURM job continues from (Lightning loads it by itself), when
    this process runs under SLURM and the run folder holds one."""
    return _hpc(run_dir)[-1] if os.environ.get("SLURM_JOB_ID") and _hpc(run_dir) else None


def guard_run_dir(run_dir: Path, resume: Path | None, force: bool) -> None:
    """Refuse to train into an existing run unless resuming it or forced; when forced, remove
    the old run's files first so that nothing of it mixes with the new one. A run without its
    finished marker (run.json) is named as incomplete."""
    if resume is not None or not holds_run(run_dir) or (not force and requeued(run_dir)):
        return
    if not force:
        last = run_dir / "checkpoints" / "last.ckpt"
        if (run_dir / FINISHED).is_file():
            what = "already holds a training run"
        elif last.is_file():
            what = "holds an incomplete training run (no run.json: it was stopped before the end)"
        else:
            raise ConfigError(
                f"{run_dir}: holds an incomplete training run with no checkpoint (stopped in "
                "its first epoch); use --force to replace it, or another --out")
        raise ConfigError(
            f"{run_dir}: {what}; use --resume {last} to continue it, --force to replace it, "
            "or another --out")
    for path in [*(run_dir / name for name in RUN_ITEMS), *_hpc(run_dir)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def mark_unfinished(run_dir: Path) -> None:
    """A run (re)starts: until it writes run.json again it is incomplete."""
    (run_dir / FINISHED).unlink(missing_ok=True)


def guard_model_files(paths: list[Path], force: bool) -> None:
    """Refuse to export over existing model files unless forced."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]}: a model is already there; use --force to replace "
                          "it, or another --out")
