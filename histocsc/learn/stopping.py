"""Stopping a training run from outside, as the other commands stop.

Ctrl-C (SIGINT) and SIGTERM (`scancel`, a SLURM time limit, a container stop) set a flag; the
run stops at the next batch boundary, so no checkpoint is cut half-written, keeping
`checkpoints/last.ckpt` of its last complete epoch, and the command exits 130 / 143 with one
line. A second Ctrl-C stops at once. SIGUSR1 under SLURM stays Lightning's own
(`SLURMEnvironment` auto-requeue): it saves `RUN/hpc_ckpt_N.ckpt` and runs `scontrol requeue`;
the requeued job's `train --out RUN` picks that checkpoint up (`guard_run_dir`).
DataLoader workers forked during the run inherit the flag handler, so a signal sent to the whole
process group (as `scancel` does) no longer kills them under the trainer's feet.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class TrainingStopped(Exception):
    """A signal stopped the run; `epochs` epochs were complete."""

    def __init__(self, signum: int, epochs: int) -> None:
        super().__init__(f"stopped by {NAMES.get(signum, signum)}")
        self.signum, self.epochs = signum, epochs

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class GracefulStop(Callback):
    """Raises TrainingStopped at the first hook after a stop signal arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.epochs = 0

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: at once
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise TrainingStopped(self.signum, self.epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs += 1
        self.check()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.check()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.check()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.check()

    def on_train_epoch_start(self, *args: Any, **kwargs: Any) -> None:
        self.check()

    def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        self.check()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[GracefulStop]:
    """SIGINT / SIGTERM handled by a GracefulStop (pass it to train's callbacks) inside."""
    stop = GracefulStop()
    previous = {s: signal.signal(s, stop.handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def worker_init(worker_id: int) -> None:
    """DataLoader worker start: SIGINT and SIGTERM ignored (the trainer stops them itself; a
    signal sent to the whole process group, as `scancel` and Ctrl-C do, must not kill them
    first: torch's own worker handler dies on a SIGTERM not sent by its parent), then
    Lightning's seeding of workers when seed_everything(workers=True) asked for it."""
    import os

    from lightning.fabric.utilities.seed import pl_worker_init_function

    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


def stop_workers() -> None:
    """Kill this process's remaining DataLoader workers (after a stop): they ignore SIGTERM
    (`worker_init`), so the interpreter's exit, which terminates daemon children with SIGTERM
    and joins them, would otherwise wait for them forever. They hold nothing to save."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call this a failure
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)
